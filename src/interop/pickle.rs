//! PyTorch state dicts as `torch.save` writes them (the zip format of PyTorch >= 1.6: a
//! `data.pkl` pickle naming each tensor's storage file, dtype, shape and strides), read with
//! candle's pickle reader: an interpreter of the pickle opcodes that builds values and never
//! runs code, so a pickle that would call a function yields no tensors and is refused.
//!
//! Untrusted bytes: the `data.pkl` entry is capped at [`PICKLE_MAX`] and walked once by
//! [`check_pickle`] before candle parses it (every length inside the bytes, and the objects the
//! opcodes would build, memo copies included, bounded), and every tensor's size (its shape
//! times its dtype's width) is checked against the file's length and the memory budget before
//! it is allocated, so a length or a shape that lies allocates nothing.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;

/// The largest `data.pkl` read (a state dict's pickle is a few hundred kB).
pub const PICKLE_MAX: u64 = 16 << 20;

/// The most objects a pickle may build (a state dict builds about 15 per tensor), a string
/// counting one per 64 bytes.
pub const PICKLE_OBJECTS: u64 = 1 << 20;

/// The tensors of the state dict in `path`, by name.
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    let at = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("{at}: cannot read"))?;
    if !meta.is_file() {
        bail!("{at}: not a file");
    }
    let file_len = meta.len();
    let mut head = [0u8; 2];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).with_context(|| format!("{at}: cannot open"))?;
        let n = f
            .read(&mut head)
            .with_context(|| format!("{at}: cannot read"))?;
        if n < 2 {
            bail!("{at}: not a PyTorch checkpoint ({file_len} bytes)");
        }
    }
    if head[0] == 0x80 {
        bail!(
            "{at}: a bare pickle (PyTorch's legacy format before 1.6); elbo reads torch.save's zip format: re-save it with torch.save(torch.load(f), new_file)"
        );
    }
    if &head != b"PK" {
        bail!("{at}: not a PyTorch checkpoint (torch.save writes a zip archive)");
    }
    check_pickle_entries(path)?;
    let infos = candle_core::pickle::read_pth_tensor_info(path, false, None).map_err(|e| {
        anyhow::anyhow!(
            "{at}: not a readable torch.save checkpoint: {}",
            first_line(&e)
        )
    })?;
    if infos.is_empty() {
        bail!(
            "{at}: holds no tensors (elbo reads a state dict of tensors; a pickle of other objects or code is not run)"
        );
    }
    let mut total = 0u64;
    for info in &infos {
        let elems: Vec<u64> = info.layout.dims().iter().map(|&d| d as u64).collect();
        let bytes = crate::limits::product(&elems)
            .and_then(|n| n.checked_mul(info.dtype.size_in_bytes() as u64));
        match bytes {
            Some(b) if b <= file_len => total += b,
            _ => bail!(
                "{at}: tensor {} claims shape {:?} of {:?}, more than the file's {file_len} bytes",
                info.name,
                info.layout.dims(),
                info.dtype
            ),
        }
    }
    crate::limits::check_bytes(&format!("{at}"), "the checkpoint's tensors", Some(total))?;
    let pth = candle_core::pickle::PthTensors::new(path, None).map_err(|e| {
        anyhow::anyhow!(
            "{at}: not a readable torch.save checkpoint: {}",
            first_line(&e)
        )
    })?;
    let mut out = HashMap::with_capacity(infos.len());
    for info in &infos {
        let t = pth
            .get(&info.name)
            .map_err(|e| anyhow::anyhow!("{at}: tensor {}: {}", info.name, first_line(&e)))?
            .with_context(|| format!("{at}: tensor {} vanished", info.name))?;
        out.insert(info.name.clone(), t);
    }
    Ok(out)
}

/// Refuses an archive whose `data.pkl` exceeds [`PICKLE_MAX`] or fails [`check_pickle`]
/// (before candle parses it).
fn check_pickle_entries(path: &Path) -> Result<()> {
    let at = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("{at}: cannot open"))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| anyhow::anyhow!("{at}: not a torch.save zip archive: {e}"))?;
    let mut pickles = 0;
    for i in 0..zip.len() {
        let entry = zip
            .by_index(i)
            .map_err(|e| anyhow::anyhow!("{at}: a broken zip entry: {e}"))?;
        if !entry.name().ends_with("data.pkl") {
            continue;
        }
        pickles += 1;
        let name = entry.name().to_string();
        if entry.size() > PICKLE_MAX {
            bail!(
                "{at}: {name} is {} bytes; a state dict's pickle is at most {PICKLE_MAX}",
                entry.size()
            );
        }
        let mut bytes = Vec::new();
        use std::io::Read;
        entry
            .take(PICKLE_MAX + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| anyhow::anyhow!("{at}: {name}: {e}"))?;
        check_pickle(&bytes).map_err(|e| anyhow::anyhow!("{at}: {name}: {e}"))?;
    }
    if pickles == 0 {
        bail!("{at}: a zip archive without data.pkl, not a torch.save checkpoint");
    }
    Ok(())
}

fn first_line(e: &dyn std::fmt::Display) -> String {
    crate::files::excerpt(e.to_string().lines().next().unwrap_or(""), 200)
}

/// Walks a pickle's opcodes as candle's interpreter would, without building anything: every
/// length-prefixed argument must fit in the bytes, every opcode must be one candle reads, and
/// the objects the stack and the memo would hold (a memo fetch copies its object) must stay
/// within [`PICKLE_OBJECTS`]. Sizes only: what candle then builds is bounded by the same count.
pub fn check_pickle(bytes: &[u8]) -> Result<()> {
    // The stack: each entry's object count, `None` for a mark.
    let mut stack: Vec<Option<u64>> = Vec::new();
    let mut memo: HashMap<u32, u64> = HashMap::new();
    let mut built = 0u64;
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<usize> {
        let start = *at;
        match start.checked_add(n) {
            Some(end) if end <= bytes.len() => {
                *at = end;
                Ok(start)
            }
            _ => bail!("the pickle ends inside an argument at byte {start}"),
        }
    };
    let le = |b: &[u8]| b.iter().rev().fold(0u64, |v, &x| (v << 8) | x as u64);
    let pop = |stack: &mut Vec<Option<u64>>| -> Result<u64> {
        match stack.pop() {
            Some(Some(n)) => Ok(n),
            _ => bail!("the pickle pops an empty stack or a mark"),
        }
    };
    let pop_mark = |stack: &mut Vec<Option<u64>>| -> Result<u64> {
        let mut sum = 0u64;
        loop {
            match stack.pop() {
                Some(Some(n)) => sum = sum.saturating_add(n),
                Some(None) => return Ok(sum),
                None => bail!("the pickle has no mark to pop to"),
            }
        }
    };
    loop {
        let Some(&op) = bytes.get(at) else {
            bail!("the pickle ends without its STOP opcode");
        };
        at += 1;
        let pushed: Option<u64> = match op {
            0x80 => {
                take(&mut at, 1)?;
                None
            }
            b'c' => {
                let mut len = 0;
                for _ in 0..2 {
                    let line = bytes[at..].iter().position(|&b| b == b'\n');
                    let Some(n) = line else {
                        bail!("the pickle's GLOBAL at byte {at} has no end of line");
                    };
                    len += n;
                    at += n + 1;
                }
                Some(1 + len as u64 / 64)
            }
            b'q' | b'r' => {
                let n = if op == b'q' { 1 } else { 4 };
                let i = take(&mut at, n)?;
                let key = le(&bytes[i..i + n]) as u32;
                let Some(Some(top)) = stack.last() else {
                    bail!("the pickle memoizes an empty stack or a mark");
                };
                memo.insert(key, *top);
                None
            }
            b'h' | b'j' => {
                let n = if op == b'h' { 1 } else { 4 };
                let i = take(&mut at, n)?;
                let key = le(&bytes[i..i + n]) as u32;
                let Some(&size) = memo.get(&key) else {
                    bail!("the pickle fetches memo {key}, never stored");
                };
                Some(size)
            }
            b'X' => {
                let i = take(&mut at, 4)?;
                let n = le(&bytes[i..i + 4]) as usize;
                take(&mut at, n)?;
                Some(1 + n as u64 / 64)
            }
            b'J' => {
                take(&mut at, 4)?;
                Some(1)
            }
            b'K' => {
                take(&mut at, 1)?;
                Some(1)
            }
            b'M' => {
                take(&mut at, 2)?;
                Some(1)
            }
            b'G' => {
                take(&mut at, 8)?;
                Some(1)
            }
            0x8a => {
                let i = take(&mut at, 1)?;
                take(&mut at, bytes[i] as usize)?;
                Some(1)
            }
            b')' | b'}' | b'd' | b']' | b'N' | 0x88 | 0x89 => Some(1),
            b'(' => {
                stack.push(None);
                None
            }
            b't' => Some(1 + pop_mark(&mut stack)?),
            0x85..=0x87 => {
                let mut sum = 1u64;
                for _ in 0..(op - 0x84) {
                    sum = sum.saturating_add(pop(&mut stack)?);
                }
                Some(sum)
            }
            // Two objects into one: REDUCE, BUILD, NEWOBJ, APPEND (into the list below).
            b'R' | b'b' | 0x81 | b'a' => {
                let (x, y) = (pop(&mut stack)?, pop(&mut stack)?);
                Some(x.saturating_add(y))
            }
            // Key and value into the dict below.
            b's' => {
                let (v, k, d) = (pop(&mut stack)?, pop(&mut stack)?, pop(&mut stack)?);
                Some(d.saturating_add(k).saturating_add(v))
            }
            // The objects above the mark into the list or dict below it.
            b'e' | b'u' => {
                let items = pop_mark(&mut stack)?;
                let target = pop(&mut stack)?;
                Some(target.saturating_add(items))
            }
            b'Q' => Some(pop(&mut stack)?),
            b'.' => return Ok(()),
            other => bail!("the pickle uses opcode 0x{other:02x}, which a state dict does not"),
        };
        if let Some(n) = pushed {
            built = built.saturating_add(n);
            if built > PICKLE_OBJECTS {
                bail!(
                    "the pickle builds more than {PICKLE_OBJECTS} objects; a state dict builds far fewer"
                );
            }
            stack.push(Some(n));
        }
    }
}
