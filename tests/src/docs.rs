//! The book in `docs/` as the suite reads it: its pages, their fenced
//! blocks, the YAML examples and the command lines in them, and each
//! resource page's field table.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize as _;

/// The book's directory (`docs/`).
pub fn book() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

/// Every Markdown page under `docs/src`, with its path and text.
pub fn pages() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                let text = std::fs::read_to_string(&path).unwrap();
                out.push((path, text));
            }
        }
    }
    let mut out = Vec::new();
    walk(&book().join("src"), &mut out);
    out
}

/// A fenced code block of a page.
#[derive(Debug, Clone)]
pub struct Block {
    /// Its info string: `yaml`, `sh`, `yaml,fragment`, …
    pub info: String,
    pub body: String,
    /// Where it is: `page:line`.
    pub at: String,
}

/// The fenced blocks of `text` (fences may be indented, in a list).
pub fn blocks(page: &Path, text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<(String, usize, usize, Vec<&str>)> = None;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start().len();
        let fence = line.trim_start().starts_with("```");
        match (&mut open, fence) {
            (None, true) => {
                let info = line.trim_start().trim_start_matches('`').trim().to_string();
                open = Some((info, indent, n + 1, Vec::new()));
            }
            (Some(_), true) => {
                let (info, _, at, body) = open.take().unwrap();
                out.push(Block {
                    info,
                    body: body.join("\n"),
                    at: format!("{}:{at}", page.display()),
                });
            }
            (Some((_, indent, _, body)), false) => {
                body.push(line.get(*indent..).unwrap_or(line.trim_start()));
            }
            (None, false) => {}
        }
    }
    out
}

/// Every fenced block of the book.
pub fn all_blocks() -> Vec<Block> {
    pages()
        .iter()
        .flat_map(|(path, text)| blocks(path, text))
        .collect()
}

/// The Kubernetes objects of every `yaml` block (a block marked
/// `yaml,fragment` is a part of an object and is skipped), with where each
/// is.
pub fn yaml_examples() -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for block in all_blocks() {
        let mut info = block.info.split(',').map(str::trim);
        if info.next() != Some("yaml") || info.any(|i| i == "fragment") {
            continue;
        }
        for doc in serde_yaml::Deserializer::from_str(&block.body) {
            let value = serde_json::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", block.at));
            if !value.is_null() {
                out.push((block.at.clone(), value));
            }
        }
    }
    out
}

/// The command lines of `sh`/`console` blocks that run `program` (after an
/// optional `$ ` or `sudo `), joined across `\` continuations, comments
/// removed, split as the shell would.
pub fn command_lines(program: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for block in all_blocks() {
        if !["sh", "console", "bash", "shell"].contains(&block.info.as_str()) {
            continue;
        }
        let joined = block.body.replace("\\\n", " ");
        for line in joined.lines() {
            let line = line.trim();
            let line = line.strip_prefix("$ ").unwrap_or(line);
            let line = line.strip_prefix("sudo ").unwrap_or(line);
            let Some(words) = shlex::split(line) else {
                panic!("{}: cannot split `{line}`", block.at);
            };
            let words: Vec<String> = words
                .into_iter()
                .take_while(|w| !w.starts_with('#'))
                .collect();
            if words.first().map(String::as_str) == Some(program) {
                out.push((block.at.clone(), words));
            }
        }
    }
    out
}

/// The field paths of kind `kind`'s schema in `deploy/crds/`: `spec.x`,
/// `spec.x[].y` (an array's items), `spec.x.y`, `status.…`, every depth.
pub fn schema_fields(kind: &str) -> BTreeSet<String> {
    let path = book().join("../deploy/crds/stillpoint.dev.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let crd = serde_json::Value::deserialize(doc).unwrap();
        if crd["spec"]["names"]["kind"] != kind {
            continue;
        }
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut out = BTreeSet::new();
        for top in ["spec", "status"] {
            collect(&schema["properties"][top], top, &mut out);
        }
        return out;
    }
    panic!("no CRD of kind {kind} in {}", path.display())
}

fn collect(schema: &serde_json::Value, at: &str, out: &mut BTreeSet<String>) {
    let (schema, at) = match schema.get("items") {
        Some(items) => (items, format!("{at}[]")),
        None => (schema, at.to_string()),
    };
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (name, sub) in props {
            let path = format!("{at}.{name}");
            out.insert(path.clone());
            collect(sub, &path, out);
        }
    }
}

/// The fields a resource page's `| field |` tables name: each backticked
/// path of a row's first cell (`spec.a.b: {…}` is `spec.a.b`); a name
/// without a dot continues the cell's previous path (`spec.a.b`, `c` names
/// `spec.a.c`).
pub fn documented_fields(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut in_table = false;
    for line in text.lines() {
        let cells: Vec<&str> = line.trim().split('|').map(str::trim).collect();
        if !line.trim_start().starts_with('|') {
            in_table = false;
            continue;
        }
        if cells.get(1) == Some(&"field") {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        let first = cells.get(1).copied().unwrap_or_default();
        let mut prefix = String::new();
        for (i, span) in first.split('`').enumerate() {
            if i % 2 == 0 {
                continue;
            }
            let name = span.split(':').next().unwrap_or_default().trim();
            let path = match name.contains('.') {
                true => name.to_string(),
                false if !prefix.is_empty() => format!("{prefix}.{name}"),
                false => continue,
            };
            prefix = path
                .rsplit_once('.')
                .map(|(p, _)| p.to_string())
                .unwrap_or_default();
            out.insert(path);
        }
    }
    out
}
