//! The book in `docs/` stays true to the product: it builds; every YAML
//! example parses as its kind; every `stillpoint …` command line parses
//! with the real CLI, and every command synopsis names real subcommands
//! and flags; each resource page's field table names every field of its
//! CRD's schema and no field it does not have. (The lab's API server
//! accepting every example is in `kube_mode.rs`.)

use clap::CommandFactory;
use stillpoint_controller::kube::crd::{
    BackupSchedule, ConsistencyGroup, GroupBackup, GroupBackupContent, GroupQuiesce, GroupRestore,
};
use stillpoint_tests::docs;

const KINDS: [&str; 6] = [
    "ConsistencyGroup",
    "GroupBackup",
    "GroupBackupContent",
    "BackupSchedule",
    "GroupQuiesce",
    "GroupRestore",
];

#[test]
fn the_book_builds_and_every_chapter_exists() {
    let out = tempfile::tempdir().unwrap();
    let mut book = mdbook::MDBook::load(docs::book()).unwrap();
    assert!(
        !book.config.build.create_missing,
        "a chapter SUMMARY.md names but nobody wrote is an error, not an empty page"
    );
    book.config.build.build_dir = out.path().to_path_buf();
    book.build()
        .unwrap_or_else(|e| panic!("building the book: {e:#}"));
    for (path, _) in docs::pages() {
        let rel = path.strip_prefix(docs::book().join("src")).unwrap();
        if rel.ends_with("SUMMARY.md") {
            continue;
        }
        let html = out.path().join(rel).with_extension("html");
        assert!(
            html.is_file(),
            "{} is not in the book (missing from SUMMARY.md?)",
            rel.display()
        );
    }
}

/// Parses `value` as `T`, the typed resource.
fn typed<T: serde::de::DeserializeOwned>(at: &str, value: &serde_json::Value) {
    if let Err(e) = serde_json::from_value::<T>(value.clone()) {
        panic!("{at}: not a valid {}: {e}", value["kind"]);
    }
}

#[test]
fn every_yaml_example_parses_as_its_kind() {
    let examples = docs::yaml_examples();
    assert!(examples.len() >= 5, "the book shows each resource");
    for (at, value) in &examples {
        for field in ["apiVersion", "kind"] {
            assert!(value[field].is_string(), "{at}: no {field}");
        }
        assert!(
            value["metadata"]["name"].is_string(),
            "{at}: no metadata.name"
        );
        match value["kind"].as_str().unwrap() {
            "ConsistencyGroup" => typed::<ConsistencyGroup>(at, value),
            "GroupBackup" => typed::<GroupBackup>(at, value),
            "BackupSchedule" => typed::<BackupSchedule>(at, value),
            "GroupQuiesce" => typed::<GroupQuiesce>(at, value),
            "GroupRestore" => typed::<GroupRestore>(at, value),
            "GroupBackupContent" => typed::<GroupBackupContent>(at, value),
            _ => typed::<kube::api::DynamicObject>(at, value),
        }
    }
    let kinds: Vec<&str> = examples
        .iter()
        .filter_map(|(_, v)| v["kind"].as_str())
        .collect();
    for kind in KINDS {
        assert!(kinds.contains(&kind), "no example of {kind} in the book");
    }
}

#[test]
fn every_command_line_parses_with_the_real_cli() {
    let lines = docs::command_lines("stillpoint");
    assert!(!lines.is_empty(), "the book shows command lines");
    for (at, words) in lines {
        if let Err(e) = <stillpoint_controller::cli::Cli as clap::Parser>::try_parse_from(&words) {
            panic!("{at}: `{}` does not parse: {e}", words.join(" "));
        }
    }
    for (at, words) in docs::command_lines("stillpoint-lab") {
        let parsed = <stillpoint_lab::cli::Cli as clap::Parser>::try_parse_from(&words);
        if let Err(e) = parsed {
            panic!("{at}: `{}` does not parse: {e}", words.join(" "));
        }
    }
}

/// The subcommand path and the flags of a synopsis such as
/// `stillpoint --kube backup create GROUP [--wait] [--id ID]`. `stillpoint
/// demo` and `bench` hand their arguments to `stillpoint-lab`'s command of
/// that name, whose flags count.
fn check_synopsis(root: &clap::Command, lab: &clap::Command, synopsis: &str) -> Result<(), String> {
    let cleaned: String = synopsis
        .chars()
        .map(|c| if "[]|…\\".contains(c) { ' ' } else { c })
        .collect();
    let mut words = cleaned.split_whitespace();
    words.next(); // the program
    let mut at = root;
    for word in words {
        if let Some(long) = word.strip_prefix("--") {
            let long = long.split('=').next().unwrap_or_default();
            let known = |c: &clap::Command| c.get_arguments().any(|a| a.get_long() == Some(long));
            let handed = lab.find_subcommand(at.get_name()).is_some_and(known);
            if !known(at) && !known(root) && !handed {
                return Err(format!("`{}` has no flag --{long}", at.get_name()));
            }
        } else if word.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            && let Some(sub) = at.find_subcommand(word)
        {
            at = sub;
        }
    }
    Ok(())
}

#[test]
fn every_command_synopsis_names_real_subcommands_and_flags() {
    let root = stillpoint_controller::cli::Cli::command();
    let lab = <stillpoint_lab::cli::Cli as CommandFactory>::command();
    let mut seen = 0;
    for (path, text) in docs::pages() {
        for (i, span) in text.split('`').enumerate() {
            if i % 2 == 1 && span.starts_with("stillpoint ") {
                seen += 1;
                if let Err(e) = check_synopsis(&root, &lab, span) {
                    panic!("{}: `{span}`: {e}", path.display());
                }
            }
        }
    }
    assert!(seen > 20, "the CLI reference shows every command ({seen})");
    // The check itself refuses what does not exist.
    assert!(check_synopsis(&root, &lab, "stillpoint backup create GROUP --nowait").is_err());
}

#[test]
fn each_resource_page_documents_every_field_of_its_crd_and_no_other() {
    for kind in KINDS {
        let page = docs::book().join(format!("src/kubernetes/{}.md", kind.to_lowercase()));
        let text = std::fs::read_to_string(&page).unwrap();
        let schema = docs::schema_fields(kind);
        let documented = docs::documented_fields(&text);
        let unknown: Vec<_> = documented.difference(&schema).collect();
        assert!(
            unknown.is_empty(),
            "{}: names fields {kind} does not have: {unknown:?}",
            page.display()
        );
        // Every field of the spec two levels deep, and of the status one.
        let required = schema.iter().filter(|f| {
            let depth = f.matches('.').count();
            (f.starts_with("spec.") && depth <= 2) || (f.starts_with("status.") && depth == 1)
        });
        // An object is documented by its own row or by rows of its fields.
        let named = |f: &String| {
            documented.contains(f)
                || documented
                    .iter()
                    .any(|d| d.starts_with(&format!("{f}.")) || d.starts_with(&format!("{f}[].")))
        };
        let missing: Vec<_> = required.filter(|f| !named(f)).collect();
        assert!(
            missing.is_empty(),
            "{}: documents no row for {missing:?}",
            page.display()
        );
    }
}

/// The relative links of `text` (in `dir`) that lead nowhere.
fn broken_links(dir: &std::path::Path, text: &str) -> Vec<String> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .filter(|target| !target.contains("://") && !target.starts_with('#'))
        .filter(|target| {
            let file = target.split('#').next().unwrap_or_default();
            !dir.join(file).exists()
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn every_link_of_the_book_and_the_readme_leads_somewhere() {
    let readme = docs::book().join("../README.md");
    let mut all = vec![(readme.clone(), std::fs::read_to_string(&readme).unwrap())];
    all.extend(docs::pages());
    for (path, text) in all {
        let broken = broken_links(path.parent().unwrap(), &text);
        assert!(
            broken.is_empty(),
            "{}: links to nothing: {broken:?}",
            path.display()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        broken_links(dir.path(), "[a](nowhere.md#x)"),
        ["nowhere.md#x"]
    );
}
