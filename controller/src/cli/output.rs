//! `-o table|json|yaml`.

use clap::ValueEnum;
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

impl Output {
    /// Prints `value` as JSON or YAML, or the `table` text.
    pub fn print<T: Serialize>(self, value: &T, table: impl FnOnce() -> String) {
        match self {
            Output::Table => print!("{}", table()),
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(value).expect("serializable")
            ),
            Output::Yaml => print!(
                "{}",
                yaml(&serde_json::to_value(value).expect("serializable"), 0)
            ),
        }
    }

    /// Whether progress and chatter belong on the terminal.
    pub fn interactive(self) -> bool {
        use std::io::IsTerminal;
        self == Output::Table && std::io::stdout().is_terminal()
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::String(s)
            if s.is_empty() || s.contains([':', '#', '\n', '\'', '"']) || s.trim() != s =>
        {
            serde_json::to_string(s).expect("string")
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A small YAML emitter for JSON-shaped data.
pub fn yaml(v: &Value, indent: usize) -> String {
    let pad = "  ".repeat(indent);
    match v {
        Value::Object(map) if map.is_empty() => format!("{pad}{{}}\n"),
        Value::Array(items) if items.is_empty() => format!("{pad}[]\n"),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| match v {
                Value::Object(m) if !m.is_empty() => format!("{pad}{k}:\n{}", yaml(v, indent + 1)),
                Value::Array(a) if !a.is_empty() => format!("{pad}{k}:\n{}", yaml(v, indent + 1)),
                _ => format!("{pad}{k}: {}\n", scalar_or_empty(v)),
            })
            .collect(),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                let inner = yaml(item, indent + 1);
                let trimmed = inner.trim_start();
                format!("{pad}- {trimmed}")
            })
            .collect(),
        other => format!("{pad}{}\n", scalar(other)),
    }
}

fn scalar_or_empty(v: &Value) -> String {
    match v {
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        other => scalar(other),
    }
}

/// Left-aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
            + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_nests() {
        let v = serde_json::json!({"id": "b-1", "members": [{"name": "pg-0", "stage": 2}], "error": null});
        let y = yaml(&v, 0);
        assert!(y.contains("id: b-1\n"), "{y}");
        assert!(
            y.contains("members:\n  - name: pg-0\n    stage: 2\n"),
            "{y}"
        );
        assert!(y.contains("error: null\n"), "{y}");
    }
}
