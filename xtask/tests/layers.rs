//! The xtask's top-level modules form layers: no import cycle between
//! them. What a module uses is read from its source: every `crate::` path
//! (in `use` lines, grouped `use crate::{...}` lists at any depth, and
//! inline paths such as `crate::deps::store(..)`), every `super::` path
//! that leaves its top-level module, and in `main.rs` (the crate root)
//! every path that starts with a declared module.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// A token of Rust source, with comments, strings and characters gone.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Other,
}

/// `text`'s identifiers, `::`, braces and commas; comments, string,
/// byte-string, raw-string and character literals are skipped, lifetimes
/// kept apart from characters.
fn tokens(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if (c == 'r' || (c == 'b' && at(i + 1) == 'r'))
            && !at(i.wrapping_sub(1)).is_alphanumeric()
            && at(i.wrapping_sub(1)) != '_'
            && {
                // r"..", r#".."#: quotes after the #s; `r#type` is a raw
                // identifier, not a string.
                let mut k = i + 1 + usize::from(c == 'b');
                while at(k) == '#' {
                    k += 1;
                }
                at(k) == '"'
            }
        {
            // r"..", r#".."#, br"..": ends at the quote and as many #s.
            i += 1 + usize::from(c == 'b');
            let mut hashes = 0;
            while at(i) == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1;
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
            out.push(Token::Other);
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(Token::Other);
        } else if c == '\'' {
            // 'x' and '\n' are characters; 'a without a closing quote is a
            // lifetime.
            if at(i + 1) == '\\' {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
            }
            out.push(Token::Other);
        } else if c == 'r' && at(i + 1) == '#' && (at(i + 2).is_alphabetic() || at(i + 2) == '_') {
            // A raw identifier, `r#type`: the identifier `type`.
            i += 2;
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c == ':' && at(i + 1) == ':' {
            out.push(Token::PathSep);
            i += 2;
        } else {
            out.push(match c {
                '{' => Token::Open,
                '}' => Token::Close,
                ',' => Token::Comma,
                _ => Token::Other,
            });
            i += 1;
        }
    }
    out
}

/// The first segments of the paths a `::` at `tokens[at]` leads to: one
/// identifier, or each item's first identifier of a `{...}` group.
fn first_segments(tokens: &[Token], at: usize) -> Vec<String> {
    match tokens.get(at + 1) {
        Some(Token::Ident(name)) => vec![name.clone()],
        Some(Token::Open) => {
            let mut found = Vec::new();
            let mut depth = 0;
            let mut expect_item = true;
            for token in &tokens[at + 1..] {
                match token {
                    Token::Open => {
                        depth += 1;
                    }
                    Token::Close => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    Token::Comma if depth == 1 => expect_item = true,
                    Token::Ident(name) if depth == 1 && expect_item => {
                        found.push(name.clone());
                        expect_item = false;
                    }
                    _ if depth == 1 => expect_item = false,
                    _ => {}
                }
            }
            found
        }
        _ => vec![],
    }
}

/// The top-level modules a file uses. `module` is the file's place in the
/// crate (`["kube", "objects"]` for `kube/objects.rs`, `[]` for
/// `main.rs`); `roots` the modules `main.rs` declares.
fn uses_of(text: &str, module: &[String], roots: &BTreeSet<String>) -> BTreeSet<String> {
    let tokens = tokens(text);
    let mut used = BTreeSet::new();
    // Inline `mod name { .. }` blocks, for `super::` inside them.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Open => depth += 1,
            Token::Close => {
                depth -= 1;
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Token::Ident(word) if word == "mod" => {
                if let (Some(Token::Ident(name)), Some(Token::Open)) =
                    (tokens.get(i + 1), tokens.get(i + 2))
                {
                    inline.push((name.clone(), depth));
                }
            }
            Token::Ident(word) if word == "crate" && tokens.get(i + 1) == Some(&Token::PathSep) => {
                used.extend(first_segments(&tokens, i + 1));
            }
            Token::Ident(word)
                if word == "super"
                    && tokens.get(i + 1) == Some(&Token::PathSep)
                    && i.checked_sub(1).map(|p| &tokens[p]) != Some(&Token::PathSep) =>
            {
                let mut here: Vec<String> = module
                    .iter()
                    .cloned()
                    .chain(inline.iter().map(|(name, _)| name.clone()))
                    .collect();
                let mut j = i;
                while tokens.get(j) == Some(&Token::Ident("super".into()))
                    && tokens.get(j + 1) == Some(&Token::PathSep)
                {
                    here.pop();
                    j += 2;
                }
                match here.first() {
                    Some(top) => {
                        used.insert(top.clone());
                    }
                    None => used.extend(first_segments(&tokens, j - 1)),
                }
                i = j;
                continue;
            }
            Token::Ident(word)
                if module.is_empty()
                    && roots.contains(word)
                    && tokens.get(i + 1) == Some(&Token::PathSep)
                    && i.checked_sub(1).map(|p| &tokens[p]) != Some(&Token::PathSep) =>
            {
                used.insert(word.clone());
            }
            _ => {}
        }
        i += 1;
    }
    // A first segment that is no module names an item of the crate root
    // (`crate::Cli`): a use of `main`.
    let used: BTreeSet<String> = used
        .into_iter()
        .filter(|name| name != "self")
        .map(|name| {
            if roots.contains(&name) {
                name
            } else {
                "main".to_owned()
            }
        })
        .filter(|name| Some(name) != module.first() && !(name == "main" && module.is_empty()))
        .collect();
    used
}

/// Every top-level module of `xtask/src` (and `main`) with the modules it
/// uses.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    fn walk(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension() == Some("rs".as_ref()) {
                found.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let main = std::fs::read_to_string(src.join("main.rs")).unwrap();
    let declared = tokens(&main);
    let roots: BTreeSet<String> = declared
        .windows(2)
        .filter_map(|pair| match pair {
            [Token::Ident(m), Token::Ident(name)] if m == "mod" => Some(name.clone()),
            _ => None,
        })
        .filter(|name| name != "tests")
        .collect();
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap().with_extension("");
        let mut module: Vec<String> = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if module.last().is_some_and(|last| last == "mod") || module == ["main"] {
            module.pop();
        }
        let name = module.first().cloned().unwrap_or_else(|| "main".into());
        let text = std::fs::read_to_string(&file).unwrap();
        graph
            .entry(name)
            .or_default()
            .extend(uses_of(&text, &module, &roots));
    }
    graph
}

/// The groups of two or more modules that reach one another (Tarjan's
/// strongly connected components).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Search<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Search<'a> {
        fn visit(&mut self, node: &'a str) {
            let n = self.index.len();
            self.index.insert(node, n);
            self.low.insert(node, n);
            self.stack.push(node);
            for next in self.graph.get(node).into_iter().flatten() {
                let next = next.as_str();
                if !self.index.contains_key(next) {
                    self.visit(next);
                    self.low.insert(node, self.low[node].min(self.low[next]));
                } else if self.stack.contains(&next) {
                    self.low.insert(node, self.low[node].min(self.index[next]));
                }
            }
            if self.low[node] == self.index[node] {
                let mut group = Vec::new();
                while let Some(top) = self.stack.pop() {
                    group.push(top.to_owned());
                    if top == node {
                        break;
                    }
                }
                if group.len() > 1 {
                    group.sort();
                    self.found.push(group);
                }
            }
        }
    }
    let mut search = Search {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !search.index.contains_key(node.as_str()) {
            search.visit(node);
        }
    }
    search.found
}

#[test]
fn no_import_cycle_between_the_top_level_modules() {
    let graph = module_graph();
    assert!(graph.len() > 20, "too few modules read: {graph:?}");
    assert!(graph["main"].contains("commands"), "{:?}", graph["main"]);
    let found = cycles(&graph);
    let edges = |group: &Vec<String>| -> Vec<String> {
        group
            .iter()
            .flat_map(|from| {
                graph[from]
                    .iter()
                    .filter(|to| group.contains(to))
                    .map(move |to| format!("{from} -> {to}"))
            })
            .collect()
    };
    assert!(
        found.is_empty(),
        "import cycles between top-level modules: {}",
        found
            .iter()
            .map(|group| format!("[{}]", edges(group).join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

/// The layers `main.rs`'s opening comment draws, top to bottom: each
/// line's modules.
fn drawn_layers() -> Vec<Vec<String>> {
    let main =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/main.rs")).unwrap();
    let picture = main
        .split("//! ```text\n")
        .nth(1)
        .and_then(|rest| rest.split("//! ```\n").next())
        .expect("main.rs's opening comment has no ```text picture of the layers");
    picture
        .lines()
        .map(|line| {
            let line = line.trim_start_matches("//!").trim();
            let names = line.split("  ").next().unwrap_or_default();
            names.split(", ").map(|m| m.trim().to_owned()).collect()
        })
        .collect()
}

/// Every module is in the picture once, and uses only modules on its own
/// line or below: the picture is the layering, not a wish.
#[test]
fn every_module_uses_only_its_own_layer_or_those_below() {
    let graph = module_graph();
    let layers = drawn_layers();
    let mut rank = BTreeMap::new();
    for (i, layer) in layers.iter().enumerate() {
        for module in layer {
            assert!(
                rank.insert(module.clone(), i).is_none(),
                "{module} is drawn twice"
            );
        }
    }
    let drawn: BTreeSet<&String> = rank.keys().collect();
    let real: BTreeSet<&String> = graph.keys().collect();
    assert_eq!(drawn, real, "the picture's modules and the tree's differ");
    let upward: Vec<String> = graph
        .iter()
        .flat_map(|(from, uses)| {
            let rank = &rank;
            uses.iter()
                .filter(move |to| rank[*to] < rank[from])
                .map(move |to| format!("{from} -> {to}"))
        })
        .collect();
    assert!(
        upward.is_empty(),
        "modules that use a layer above their own in main.rs's picture: {upward:?}"
    );
}

/// The reader catches every form a module can be named in, and nothing in
/// comments or strings.
#[test]
fn every_way_of_naming_a_module_is_read() {
    let roots: BTreeSet<String> = ["config", "deps", "exec", "output", "kube", "time", "git"]
        .map(String::from)
        .into();
    let text = r##"
        use crate::config::Config;
        use crate::{
            exec::{Cmd, Exec},
            output,
        };
        fn f() -> bool { crate::deps::Kind::of(p).is_some() }
        // crate::time::now in a comment
        const S: &str = "crate::git::Revision in a string";
        const R: &str = r#"crate::git in a raw string"#;
        fn g<'a>(c: char) -> bool { c == '{' }
        fn h(c: &Condition) -> bool { c.r#type == "x" && crate::git::Revision::ok() }
        fn i() -> bool { crate::Cli::ok() }
        mod tests {
            use super::*;
            use super::super::kube::Kube;
        }
    "##;
    let module = vec!["kube".to_owned(), "objects".to_owned()];
    let found = uses_of(text, &module, &roots);
    let expected: BTreeSet<String> = ["config", "deps", "exec", "git", "main", "output"]
        .map(String::from)
        .into();
    // `super::super::kube` inside `mod tests` of `kube/objects.rs` is
    // `kube` itself, not a dependency.
    assert_eq!(found, expected);
    let from_root = uses_of(
        "fn main() { output::Output::new(); exec::run() }",
        &[],
        &roots,
    );
    assert_eq!(from_root, ["exec", "output"].map(String::from).into());
    let upward = uses_of("use super::super::time;", &module, &roots);
    assert_eq!(upward, ["time"].map(String::from).into());
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_owned(), ["b".to_owned()].into()),
        ("b".to_owned(), ["a".to_owned()].into()),
        ("c".to_owned(), ["a".to_owned()].into()),
    ]
    .into();
    assert_eq!(cycles(&graph), vec![vec!["a".to_owned(), "b".to_owned()]]);
}
