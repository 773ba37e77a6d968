//! The documentation stays true to the command line: every command the README and `docs/*.md`
//! show in a code block, and every flag a section of `docs/cli.md` names for its command, is
//! checked against that command's `--help`. A renamed or removed flag fails here.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// `elbo ARGS --help`, cached by the command path (`["train", "vae"]`).
fn help(cache: &mut BTreeMap<Vec<String>, String>, path: &[String]) -> String {
    cache
        .entry(path.to_vec())
        .or_insert_with(|| {
            let o = Command::new(env!("CARGO_BIN_EXE_elbo"))
                .args(path)
                .arg("--help")
                .output()
                .unwrap();
            assert!(o.status.success(), "elbo {} --help failed", path.join(" "));
            String::from_utf8_lossy(&o.stdout).into_owned()
        })
        .clone()
}

/// elbo's commands.
const COMMANDS: [&str; 6] = [
    "train",
    "eval",
    "sample",
    "reconstruct",
    "report",
    "schedule",
];

/// The commands that take a model kind after them.
const FAMILIES: [&str; 4] = ["train", "eval", "sample", "reconstruct"];

/// The command path of `words` (`train vae ...` -> `["train", "vae"]`, `report DIR` ->
/// `["report"]`).
fn command_path(words: &[&str]) -> Vec<String> {
    match words {
        [family, kind, ..] if FAMILIES.contains(family) => {
            vec![family.to_string(), kind.to_string()]
        }
        [command, ..] => vec![command.to_string()],
        [] => Vec::new(),
    }
}

/// The `--flags` in `text` (a flag is `--` then lowercase letters, digits and dashes).
fn flags(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("--") {
        let start = i + at;
        let mut end = start + 2;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'-')
        {
            end += 1;
        }
        let before = if start == 0 { b' ' } else { bytes[start - 1] };
        if end > start + 2 && !before.is_ascii_alphanumeric() && before != b'-' {
            out.push(text[start..end].trim_end_matches('-').to_string());
        }
        i = end;
    }
    out
}

/// Fails unless every flag of `flag_text` is in the help of `path`.
fn check(
    cache: &mut BTreeMap<Vec<String>, String>,
    path: &[String],
    flag_text: &str,
    where_: &str,
    problems: &mut Vec<String>,
) {
    let text = help(cache, path);
    for flag in flags(flag_text) {
        // Flags of cargo and mpirun in the same line are not elbo's.
        if ["--release", "--features", "--oversubscribe", "--np"].contains(&flag.as_str()) {
            continue;
        }
        let known = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .any(|w| w == flag);
        if !known {
            problems.push(format!("{where_}: `elbo {}` has no {flag}", path.join(" ")));
        }
    }
}

#[test]
fn every_command_and_flag_the_docs_show_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut cache = BTreeMap::new();
    let mut problems = Vec::new();
    let mut commands = 0;
    for file in &files {
        let name = file.strip_prefix(root).unwrap().display().to_string();
        let text = std::fs::read_to_string(file).unwrap();
        // Code blocks: each line that runs elbo.
        let mut in_code = false;
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
                continue;
            }
            if !in_code {
                continue;
            }
            let line = line.split(" #").next().unwrap_or("");
            let rest = ["cargo run --release -- ", "target/release/elbo ", "elbo "]
                .iter()
                .find_map(|p| line.find(p).map(|at| &line[at + p.len()..]));
            let Some(rest) = rest else { continue };
            let words: Vec<&str> = rest.split_whitespace().collect();
            let path = command_path(&words);
            if path.is_empty() || !COMMANDS.contains(&path[0].as_str()) {
                continue;
            }
            commands += 1;
            check(
                &mut cache,
                &path,
                rest,
                &format!("{name}:{}", n + 1),
                &mut problems,
            );
        }
        // docs/cli.md: each `### `elbo COMMAND ...`` section's synopsis: its heading, its
        // flag table's rows and its `[--flag ...]` lines (the prose around them may name
        // other commands' flags).
        if name.ends_with("cli.md") {
            for section in text.split("\n### `elbo ").skip(1) {
                let heading = section.lines().next().unwrap_or("");
                let words: Vec<&str> = heading.trim_end_matches('`').split_whitespace().collect();
                let path = command_path(&words);
                let synopsis: Vec<&str> = section
                    .lines()
                    .enumerate()
                    .filter(|(i, l)| *i == 0 || l.starts_with("| `--") || l.starts_with("`["))
                    .map(|(_, l)| l)
                    .collect();
                commands += 1;
                check(
                    &mut cache,
                    &path,
                    &synopsis.join("\n"),
                    &format!("{name}, section `elbo {heading}"),
                    &mut problems,
                );
            }
        }
    }
    assert!(commands >= 20, "only {commands} commands found in the docs");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_renamed_flag_would_be_caught() {
    let mut cache = BTreeMap::new();
    let mut problems = Vec::new();
    let path = vec!["train".to_string(), "vae".to_string()];
    check(&mut cache, &path, "`--epochs 3`", "ok", &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    check(&mut cache, &path, "`--epoch-count 3`", "bad", &mut problems);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        flags("`--a-b`, x--y, --c. `--num-train-timesteps T`"),
        ["--a-b", "--c", "--num-train-timesteps"]
    );
}
