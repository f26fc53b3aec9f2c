//! The README and `docs/` say what the code does: every relative link
//! resolves (file and heading), every environment variable the xtask reads
//! is documented and every documented one is read, and every event kind
//! the code emits is documented and every documented one is emitted. (The
//! command lines the docs show are parsed by the CLI in `main.rs`'s tests,
//! the configuration keys checked against the schema in `config.rs`'s, and
//! each event's fields against `docs/json.md` wherever a test reads
//! `--json` output: `common::parse_events`.)

// The tests drive the xtask from outside: they read the environment and
// run processes themselves (clippy.toml's rules are the xtask's).
#![allow(clippy::disallowed_methods)]

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The README and every page under `docs/`, with their text.
fn pages() -> Vec<(PathBuf, String)> {
    let mut files = vec![repo().join("README.md")];
    for entry in std::fs::read_dir(repo().join("docs")).unwrap() {
        files.push(entry.unwrap().path());
    }
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).unwrap();
            (file, text)
        })
        .collect()
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces
/// as hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors_of(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| anchor(line.trim_start_matches('#')))
        .collect()
}

/// Text outside code blocks, where links are links.
fn prose(text: &str) -> String {
    text.split("```").step_by(2).collect::<Vec<_>>().join("\n")
}

#[test]
fn every_relative_link_resolves_to_a_file_and_heading() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for (file, text) in pages() {
        let dir = file.parent().unwrap();
        for target in prose(&text).split("](").skip(1) {
            let target = target.split(')').next().unwrap();
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, fragment) = target.split_once('#').unwrap_or((target, ""));
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            if !resolved.exists() {
                broken.push(format!("{}: {target} (no such file)", file.display()));
                continue;
            }
            if !fragment.is_empty() {
                let linked = std::fs::read_to_string(&resolved).unwrap_or_default();
                if !anchors_of(&linked).contains(fragment) {
                    broken.push(format!("{}: {target} (no such heading)", file.display()));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} links found");
    assert!(broken.is_empty(), "{broken:#?}");
}

/// Every `.rs` file under `xtask/src`, with its text.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, found: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension() == Some("rs".as_ref()) {
                let text = std::fs::read_to_string(&path).unwrap();
                found.push((path.display().to_string(), text));
            }
        }
    }
    let mut found = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut found,
    );
    found
}

/// The string literals that follow `marker` in `text`: `var("HOME")`
/// gives `HOME` for the marker `var(`; `push_env(` is not `env(`.
fn literals_after(text: &str, marker: &str) -> Vec<String> {
    let pieces: Vec<&str> = text.split(marker).collect();
    pieces
        .windows(2)
        .filter(|pair| {
            !pair[0]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .map(|pair| pair[1])
        .filter_map(|rest| rest.strip_prefix('"'))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_environment_variable_read_is_documented_and_every_documented_one_is_read() {
    // Every read goes through `Env` (clippy's disallowed-methods): its
    // `var`, `var_os` and `is_set`, and the closure `Config::load` hands
    // the merge (`env("XTASK_REGISTRY")`).
    let mut read = BTreeSet::new();
    for (_, text) in sources() {
        for marker in ["var(", "var_os(", "is_set(", "env("] {
            read.extend(literals_after(&text, marker).into_iter().filter(|name| {
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            }));
        }
    }
    let page = std::fs::read_to_string(repo().join("docs/configuration.md")).unwrap();
    let table = page.split("## Environment variables").nth(1).unwrap();
    let documented: BTreeSet<String> = table
        .lines()
        .filter(|line| line.starts_with("| `"))
        .flat_map(|line| {
            let first = line.split(" | ").next().unwrap().to_owned();
            first
                .split(", ")
                .map(|name| {
                    name.trim_matches(|c| c == '|' || c == ' ' || c == '`')
                        .to_owned()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(read.len() > 15, "{read:?}");
    assert_eq!(
        documented, read,
        "docs/configuration.md's variables and those the code reads"
    );
}

#[test]
fn every_event_kind_emitted_is_documented_and_every_documented_one_is_emitted() {
    let documented: BTreeSet<String> = common::documented_events()
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    let sources = sources();
    // `.event("kind", ...)` calls, the kind written out; `docker.rs` picks
    // one of the image kinds at run time, each a literal there.
    let mut emitted = BTreeSet::new();
    for (_, text) in &sources {
        for call in text.split(".event(").skip(1) {
            let first = call.trim_start();
            if let Some(rest) = first.strip_prefix('"') {
                emitted.insert(rest.split('"').next().unwrap().to_owned());
            }
        }
    }
    let all_text: String = sources.iter().map(|(_, text)| text.as_str()).collect();
    let mut unemitted = Vec::new();
    for kind in &documented {
        if !all_text.contains(&format!("\"{kind}\"")) {
            unemitted.push(kind.clone());
        }
    }
    let undocumented: Vec<&String> = emitted.difference(&documented).collect();
    assert!(emitted.len() > 10, "{emitted:?}");
    assert!(
        undocumented.is_empty() && unemitted.is_empty(),
        "emitted but not in docs/json.md: {undocumented:?}; documented but never emitted: {unemitted:?}"
    );
}
