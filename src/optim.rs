//! Parameters in one flat buffer, and the one Adam (Kingma & Ba 2015) that updates them, as
//! `torch.optim.Adam` computes it:
//!
//! ```text
//! m_t = b1 m_{t-1} + (1 - b1) g,   v_t = b2 v_{t-1} + (1 - b2) g^2
//! theta -= lr * (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)
//! ```
//!
//! Every training step of elbo (candle's autodiff and the fused engines alike, see
//! `engine::TrainStep`) reads its parameters from one flat `[f32]` buffer, laid out by
//! a [`ParamTable`] (name, shape, offset), and writes the gradient into another of the same
//! layout; Adam updates the buffer with one fused kernel. Written here rather than taken from
//! `candle_nn::AdamW` because a resumable run needs the moments m, v and the step count in the
//! checkpoint (`adam.m.NAME`, `adam.v.NAME`, the step), and candle keeps them private.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl AdamConfig {
    /// PyTorch's defaults (betas 0.9, 0.999, eps 1e-8) at `lr`.
    pub fn with_lr(lr: f64) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// One named parameter tensor in a flat buffer: `values[offset..offset + shape.product()]`,
/// row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

impl ParamEntry {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// The layout of a flat parameter buffer: which named tensor sits where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamTable {
    entries: Vec<ParamEntry>,
    len: usize,
}

impl ParamTable {
    /// Tensors `(name, shape)` one after another, in the order given.
    pub fn packed<S: Into<String>>(items: impl IntoIterator<Item = (S, Vec<usize>)>) -> Self {
        let mut table = Self::default();
        for (name, shape) in items {
            table.push(name.into(), shape);
        }
        table
    }

    /// The table of named candle variables, packed in their order.
    pub fn of_vars(vars: &[(String, Var)]) -> Self {
        Self::packed(vars.iter().map(|(n, v)| (n.clone(), v.dims().to_vec())))
    }

    /// The table of a network's tensors laid out at the given offsets of a buffer of `len`
    /// values, each named after the variable `vars` holds it in (`what` names the engine in
    /// the error when a tensor is not among them).
    pub fn of_tensors(
        tensors: &[(Tensor, usize)],
        vars: &[(String, Var)],
        len: usize,
        what: &str,
    ) -> Result<Self> {
        let names: HashMap<candle_core::TensorId, &str> = vars
            .iter()
            .map(|(n, v)| (v.as_tensor().id(), n.as_str()))
            .collect();
        let mut entries = Vec::with_capacity(tensors.len());
        for (t, at) in tensors {
            let Some(name) = names.get(&t.id()) else {
                bail!("{what}: a parameter of the network is not among its variables");
            };
            entries.push(ParamEntry {
                name: name.to_string(),
                shape: t.dims().to_vec(),
                offset: *at,
            });
        }
        Self::with_offsets(entries, len)
    }

    /// Entries at the given offsets (which may leave gaps, as an engine's scratch regions do);
    /// `len` is the buffer's length.
    pub fn with_offsets(entries: Vec<ParamEntry>, len: usize) -> Result<Self> {
        for e in &entries {
            if e.offset + e.len() > len {
                bail!("parameter {} ends past the buffer's {len} values", e.name);
            }
        }
        Ok(Self { entries, len })
    }

    fn push(&mut self, name: String, shape: Vec<usize>) {
        let entry = ParamEntry {
            name,
            shape,
            offset: self.len,
        };
        self.len += entry.len();
        self.entries.push(entry);
    }

    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    /// The buffer's length.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of parameters (values that belong to an entry).
    pub fn count(&self) -> usize {
        self.entries.iter().map(ParamEntry::len).sum()
    }

    /// The named tensors of a buffer with this layout (`prefix` before each name), on `device`.
    pub fn tensors(
        &self,
        values: &[f32],
        prefix: &str,
        device: &Device,
    ) -> Result<Vec<(String, Tensor)>> {
        self.entries
            .iter()
            .map(|e| {
                let t = Tensor::from_slice(&values[e.range()], e.shape.as_slice(), device)?;
                Ok((format!("{prefix}{}", e.name), t))
            })
            .collect()
    }

    /// Fills a buffer of this layout from named tensors (`prefix` before each name); `what`
    /// names their source in errors. Every entry must be present with its shape.
    pub fn read(
        &self,
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        what: &str,
        values: &mut [f32],
    ) -> Result<()> {
        for e in &self.entries {
            let key = format!("{prefix}{}", e.name);
            let t = tensors
                .get(&key)
                .with_context(|| format!("{what} has no tensor {key}"))?;
            if t.dims() != e.shape.as_slice() {
                bail!(
                    "{what}: {key} has shape {:?}, expected {:?}",
                    t.dims(),
                    e.shape
                );
            }
            let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            values[e.range()].copy_from_slice(&v);
        }
        Ok(())
    }

    /// The current values of the candle variables `vars` (the variables of this table, in its
    /// order) as a flat buffer.
    pub fn gather(&self, vars: &[(String, Var)]) -> Result<Vec<f32>> {
        let mut values = vec![0f32; self.len];
        for (e, (_, var)) in self.entries.iter().zip(vars) {
            let v = var.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            values[e.range()].copy_from_slice(&v);
        }
        Ok(values)
    }

    /// Writes a flat buffer into the candle variables `vars` (this table's, in its order).
    pub fn scatter(&self, values: &[f32], vars: &[(String, Var)]) -> Result<()> {
        for (e, (_, var)) in self.entries.iter().zip(vars) {
            let t = Tensor::from_slice(&values[e.range()], e.shape.as_slice(), var.device())?
                .to_dtype(var.dtype())?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// Writes a flat buffer into the candle variables of the same names (`vars` in any order;
    /// each entry must be among them).
    pub fn write_named(&self, values: &[f32], vars: &[(String, Var)]) -> Result<()> {
        let by_name: HashMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        for e in &self.entries {
            let var = by_name
                .get(e.name.as_str())
                .with_context(|| format!("the model has no parameter {}", e.name))?;
            let t = Tensor::from_slice(&values[e.range()], e.shape.as_slice(), var.device())?
                .to_dtype(var.dtype())?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// The gradients of `vars` in a `GradStore` (a variable it lacks: zeros) as a flat buffer.
    pub fn gather_grads(
        &self,
        vars: &[(String, Var)],
        grads: &GradStore,
        out: &mut [f32],
    ) -> Result<()> {
        for (e, (_, var)) in self.entries.iter().zip(vars) {
            match grads.get(var.as_tensor()) {
                Some(g) => {
                    let v = g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    out[e.range()].copy_from_slice(&v);
                }
                None => out[e.range()].fill(0.0),
            }
        }
        Ok(())
    }
}

/// Adam's moments and step over a flat buffer of the layout `table`.
pub struct Adam {
    pub config: AdamConfig,
    table: ParamTable,
    m: Vec<f32>,
    v: Vec<f32>,
    step: u64,
}

impl Adam {
    /// Fresh moments for a buffer laid out by `table`; its names key the state in checkpoints.
    pub fn new(table: ParamTable, config: AdamConfig) -> Self {
        let n = table.len();
        Self {
            config,
            table,
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
        }
    }

    /// Adam for named candle variables (see [`Adam::step_vars`]).
    pub fn for_vars(vars: &[(String, Var)], config: AdamConfig) -> Self {
        Self::new(ParamTable::of_vars(vars), config)
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn table(&self) -> &ParamTable {
        &self.table
    }

    /// Counts one more update and returns its scalars (the bias corrections of step t): for an
    /// update made elsewhere (a resident training step on a device) with the moments of
    /// [`Adam::moments_mut`].
    pub fn advance(&mut self) -> AdamScalars {
        self.step += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        AdamScalars {
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            lr_bc1: (c.lr / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: c.eps as f32,
        }
    }

    /// The first and second moments, laid out by the table.
    pub fn moments_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        (&mut self.m, &mut self.v)
    }

    /// One update of `params` from `grads` (both laid out by the table), the buffer cut into
    /// `threads` pieces (the kernel is memory-bound: four streams of the parameters).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], threads: usize) -> Result<()> {
        let n = self.table.len();
        if params.len() != n || grads.len() != n {
            bail!(
                "Adam: {} parameters and {} gradients for a table of {n}",
                params.len(),
                grads.len()
            );
        }
        let scalars = self.advance();
        if threads <= 1 {
            adam_kernel(params, grads, &mut self.m, &mut self.v, scalars);
            return Ok(());
        }
        let piece = n.div_ceil(threads).max(1);
        params
            .par_chunks_mut(piece)
            .zip(grads.par_chunks(piece))
            .zip(self.m.par_chunks_mut(piece))
            .zip(self.v.par_chunks_mut(piece))
            .for_each(|(((p, g), m), v)| adam_kernel(p, g, m, v, scalars));
        Ok(())
    }

    /// One update of candle variables from a `loss.backward()`: gathers them and their
    /// gradients into flat buffers, steps, writes the variables back. (`vars` are those the
    /// Adam was made for, in order.)
    pub fn step_vars(&mut self, vars: &[(String, Var)], grads: &GradStore) -> Result<()> {
        let mut params = self.table.gather(vars)?;
        let mut flat = vec![0f32; self.table.len()];
        self.table.gather_grads(vars, grads, &mut flat)?;
        self.step(&mut params, &flat, 1)?;
        self.table.scatter(&params, vars)
    }

    /// The state as named CPU tensors (`adam.m.NAME`, `adam.v.NAME`) and the step count.
    pub fn state(&self) -> Result<(Vec<(String, Tensor)>, u64)> {
        let mut out = Vec::new();
        for (kind, buf) in [("m", &self.m), ("v", &self.v)] {
            out.extend(
                self.table
                    .tensors(buf, &format!("adam.{kind}."), &Device::Cpu)?,
            );
        }
        Ok((out, self.step))
    }

    /// Restores what [`Adam::state`] gave.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        let what = "optimizer state";
        self.table.read(tensors, "adam.m.", what, &mut self.m)?;
        self.table.read(tensors, "adam.v.", what, &mut self.v)?;
        self.step = step;
        Ok(())
    }
}

/// The numbers of one Adam update ([`Adam::advance`]).
#[derive(Debug, Clone, Copy)]
pub struct AdamScalars {
    pub beta1: f32,
    pub beta2: f32,
    /// `lr / (1 - beta1^t)`.
    pub lr_bc1: f32,
    /// `1 / (1 - beta2^t)`.
    pub inv_bc2: f32,
    pub eps: f32,
}

/// One Adam update of a piece of the parameters with the scalars of [`Adam::advance`] (the
/// host's share of a step whose other parameters are updated elsewhere). Slices of one length.
pub fn adam_apply(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    c: AdamScalars,
) -> Result<()> {
    if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
        bail!(
            "Adam: {} parameters, {} gradients and moments of {} and {}",
            p.len(),
            g.len(),
            m.len(),
            v.len()
        );
    }
    adam_kernel(p, g, m, v, c);
    Ok(())
}

/// `m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= (lr/bc1) m / (sqrt(v/bc2) + eps)`.
#[multiversion::multiversion(targets = "simd")]
fn adam_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamScalars) {
    for i in 0..p.len() {
        let gi = g[i];
        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
        p[i] -= c.lr_bc1 * m[i] / ((v[i] * c.inv_bc2).sqrt() + c.eps);
    }
}
