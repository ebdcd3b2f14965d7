//! The agent's top-level modules form layers (docs/architecture.md §2.1): a module uses only
//! modules of lower layers, so no cycle can form between them. This test reads the sources and
//! the documented layer table and checks both: every `crate::<module>` path in a module's files
//! (tests inside them included) names a module of a lower layer, and the module graph has no
//! cycle (reported with its path when there is one).

#![allow(clippy::unwrap_used)] // test code

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The Rust text of `code` with comments and string and character literals blanked, so that
/// only paths the compiler sees remain (doc links and URLs do not count).
fn code_only(code: &str) -> String {
    let b: Vec<char> = code.chars().collect();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r'
            && matches!(next, Some('"' | '#'))
            && !b[..i]
                .last()
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // A raw string r"…" or r#"…"#: skip to the quote followed by as many hashes.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (1..=hashes).all(|k| b.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
            out.push_str("\"\"");
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                i += if b[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && (next == Some('\\') || b.get(i + 2) == Some(&'\'')) {
            // A character literal ('x', '\n', '\u{..}'); a lone quote is a lifetime.
            i += 1;
            while i < b.len() && b[i] != '\'' {
                i += if b[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_at(chars: &[char], mut i: usize) -> (String, usize) {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    let start = i;
    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
        i += 1;
    }
    (chars[start..i].iter().collect(), i)
}

/// The top-level modules a piece of code names through `crate::` (including each branch of
/// `use crate::{a::X, b::{Y, Z}}`).
fn crate_refs(code: &str) -> BTreeSet<String> {
    let chars: Vec<char> = code_only(code).chars().collect();
    let text: String = chars.iter().collect();
    let mut found = BTreeSet::new();
    let mut from = 0;
    while let Some(pos) = text[from..].find("crate::") {
        let at = from + pos;
        from = at + "crate::".len();
        let before = text[..at].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `loraplane_crate::`, not this crate
        }
        // `text` is indexed by bytes, `chars` by characters: count the characters up to here.
        let ci = text[..from].chars().count();
        let (name, end) = ident_at(&chars, ci);
        if !name.is_empty() {
            found.insert(name);
            continue;
        }
        if chars.get(end) != Some(&'{') {
            continue;
        }
        // A use tree: the first identifier of every top-level item in the braces.
        let mut depth = 0;
        let mut item_start = true;
        let mut i = end;
        while i < chars.len() {
            match chars[i] {
                '{' => {
                    depth += 1;
                    i += 1;
                    if depth == 1 {
                        item_start = true;
                    }
                }
                '}' => {
                    depth -= 1;
                    i += 1;
                    if depth == 0 {
                        break;
                    }
                }
                ',' if depth == 1 => {
                    item_start = true;
                    i += 1;
                }
                c if depth == 1 && item_start && !c.is_whitespace() => {
                    let (name, next) = ident_at(&chars, i);
                    if !name.is_empty() && name != "self" {
                        found.insert(name);
                    }
                    item_start = false;
                    i = next.max(i + 1);
                }
                _ => i += 1,
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each top-level module of `src/` (a `name.rs` or a `name/` directory, the crate roots
/// excepted) and the other top-level modules its files name.
fn module_graph() -> Graph {
    let mut graph = Graph::new();
    for entry in std::fs::read_dir(src_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut files = Vec::new();
        if path.is_dir() {
            rust_files(&path, &mut files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        } else {
            continue;
        }
        let mut uses = BTreeSet::new();
        for file in files {
            uses.extend(crate_refs(&std::fs::read_to_string(&file).unwrap()));
        }
        uses.remove(&name);
        graph.insert(name, uses);
    }
    graph
}

/// A cycle of the graph as a path `a -> b -> … -> a`, if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|n| n == next).unwrap();
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(node, graph, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

/// The layer of each module, from the table of docs/architecture.md §2.1: rows
/// `| N | `a`, `b` | … |`.
fn documented_layers() -> BTreeMap<String, u32> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/architecture.md");
    let text = std::fs::read_to_string(&doc).unwrap();
    let section = text
        .split("\n### 2.1 ")
        .nth(1)
        .expect("docs/architecture.md has a §2.1 with the agent's layers");
    let section = section.split("\n#").next().unwrap_or(section);
    let mut layers = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (Some(layer), Some(modules)) = (cells.get(1), cells.get(2)) else {
            continue;
        };
        let Ok(layer) = layer.parse::<u32>() else {
            continue;
        };
        for name in modules.split(',') {
            let name = name.trim().trim_matches('`');
            let previous = layers.insert(name.to_owned(), layer);
            assert!(previous.is_none(), "{name} is listed twice in §2.1");
        }
    }
    assert!(!layers.is_empty(), "no layer rows found in §2.1");
    layers
}

#[test]
fn crate_paths_are_found_in_code_only() {
    let code = r##"
        use crate::engine::Engine;
        use crate::{api::auth::{self, Tenants}, lora::ids::AdapterKey, metrics};
        // crate::comment_only
        /* crate::block_comment */
        let s = "crate::in_a_string";
        let r = r#"crate::in_a_raw_string"#;
        let c = '"'; let l: &'static str = ""; crate::sources::resolve();
        loraplane_crate::not_ours();
    "##;
    let found: Vec<String> = crate_refs(code).into_iter().collect();
    assert_eq!(found, ["api", "engine", "lora", "metrics", "sources"]);
}

#[test]
fn cycles_are_found() {
    let graph: Graph = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    let mut acyclic = graph.clone();
    acyclic.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&acyclic), None);
}

#[test]
fn no_cycle_between_top_level_modules() {
    let graph = module_graph();
    assert!(graph.contains_key("engine") && graph.contains_key("api"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!("module cycle in node-agent/src: {}", cycle.join(" -> "));
    }
}

#[test]
fn modules_use_only_lower_layers() {
    let graph = module_graph();
    let layers = documented_layers();
    let mut problems = Vec::new();
    for (module, uses) in &graph {
        let Some(&mine) = layers.get(module) else {
            problems.push(format!("{module} is not in the table of §2.1"));
            continue;
        };
        for used in uses {
            match layers.get(used) {
                Some(&theirs) if theirs < mine => {}
                Some(&theirs) => problems.push(format!(
                    "{module} (layer {mine}) uses {used} (layer {theirs})"
                )),
                None => problems.push(format!("{module} uses {used}, which §2.1 does not list")),
            }
        }
    }
    for listed in layers.keys() {
        if !graph.contains_key(listed) {
            problems.push(format!("§2.1 lists {listed}, which node-agent/src lacks"));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/architecture.md §2.1 and node-agent/src disagree:\n  {}",
        problems.join("\n  ")
    );
}
