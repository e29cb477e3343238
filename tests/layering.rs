//! The layers keep their promises. Scans `src/` and fails on an arrow that
//! points the wrong way:
//!
//! - only the API (`src/api/`, its error type included, and the wiring
//!   in `src/app.rs` and `src/main.rs`) names the HTTP crates;
//! - only `src/store/` names sqlx;
//! - only the API and the wiring name `crate::api`;
//! - `data/` and `models/` know neither the database, HTTP, nor the layers
//!   above them; `store/`, `train/` and `serve/` know nothing above them.
//!
//! Comments and string literals are skipped, so a doc line that mentions
//! `axum::Router` is no import.

use std::path::{Path, PathBuf};

/// Crates of the HTTP stack.
const HTTP_CRATES: &[&str] = &["axum", "http", "hyper", "hyper_util", "tower", "tower_http"];
/// Crates that speak SQL.
const SQL_CRATES: &[&str] = &["sqlx"];

/// Paths under `src/` (a folder ends in `/`) that may name the HTTP crates.
const HTTP_ALLOWED: &[&str] = &["api/", "app.rs", "main.rs"];
/// Paths under `src/` that may name sqlx.
const SQL_ALLOWED: &[&str] = &["store/"];

/// `crate::` modules that only some paths may name.
const RESTRICTED: &[(&str, &[&str])] = &[
    // `config` builds the API's limits from flags.
    ("api", &["api/", "app.rs", "main.rs", "config.rs"]),
];

/// What each lower layer must not name: the layers above it.
const BELOW: &[(&str, &[&str])] = &[
    (
        "data/",
        &[
            "app",
            "auth",
            "artifacts",
            "models",
            "sandbox",
            "serve",
            "store",
            "train",
        ],
    ),
    (
        "models/",
        &["app", "auth", "artifacts", "serve", "store", "train"],
    ),
    ("store/", &["app", "auth", "sandbox", "serve", "train"]),
    ("train/", &["app", "auth", "sandbox", "serve"]),
    ("serve/", &["app", "auth", "store", "train"]),
];

fn allowed(rel: &str, paths: &[&str]) -> bool {
    paths.iter().any(|p| {
        if p.ends_with('/') {
            rel.starts_with(p)
        } else {
            rel == *p
        }
    })
}

/// Every rule `code` (the file at `rel` under `src/`) breaks.
fn violations(rel: &str, code: &str) -> Vec<String> {
    let code = strip_comments_and_literals(code);
    let mut found = Vec::new();
    for name in external_crates(&code) {
        if HTTP_CRATES.contains(&name.as_str()) && !allowed(rel, HTTP_ALLOWED) {
            found.push(format!(
                "{rel}: names the HTTP crate `{name}` (only the API may)"
            ));
        }
        if SQL_CRATES.contains(&name.as_str()) && !allowed(rel, SQL_ALLOWED) {
            found.push(format!("{rel}: names `{name}` (only src/store/ may)"));
        }
    }
    for module in crate_modules(&code) {
        for (restricted, paths) in RESTRICTED {
            if module == *restricted && !allowed(rel, paths) {
                found.push(format!(
                    "{rel}: names crate::{module}, which {paths:?} alone may"
                ));
            }
        }
        for (layer, above) in BELOW {
            if rel.starts_with(layer) && above.contains(&module.as_str()) {
                found.push(format!(
                    "{rel}: names crate::{module}, a layer above {layer}"
                ));
            }
        }
    }
    found
}

/// The code with comments, string literals and char literals blanked, so
/// that only real paths are seen.
fn strip_comments_and_literals(src: &str) -> String {
    let chars: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let at = |i: usize, s: &str| {
        s.chars()
            .enumerate()
            .all(|(k, c)| chars.get(i + k) == Some(&c))
    };
    while i < chars.len() {
        let c = chars[i];
        let ident_before = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if at(i, "//") {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if at(i, "/*") {
            let mut depth = 0;
            while i < chars.len() {
                if at(i, "/*") {
                    depth += 1;
                    i += 2;
                } else if at(i, "*/") {
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
        } else if !ident_before && (at(i, "r#") || at(i, "r\"") || at(i, "br")) {
            // A raw string: r"…", r#"…"#, br"…".
            let mut j = i + if c == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let end: String = std::iter::once('"')
                .chain("#".repeat(hashes).chars())
                .collect();
            j += 1;
            while j < chars.len() && !at(j, &end) {
                j += 1;
            }
            i = j + end.chars().count();
            out.push_str("\"\"");
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && chars.get(i + 1) == Some(&'\\') {
            // An escaped char literal: '\n', '\'', '\u{…}'.
            i += 3;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            i += 3;
            out.push_str("' '");
        } else {
            // Lifetimes and everything else stay.
            out.push(c);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Identifiers of `code`, each with the text before and after it.
fn idents(code: &str) -> Vec<(&str, &str, &str)> {
    let mut found = Vec::new();
    let mut start = None;
    for (i, c) in code
        .char_indices()
        .chain(std::iter::once((code.len(), ' ')))
    {
        match (start, is_ident(c)) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                found.push((&code[..s], &code[s..i], &code[i..]));
                start = None;
            }
            _ => {}
        }
    }
    found
}

/// Crates used as the root of a path (`sqlx::…`, `::sqlx::…`), in an
/// attribute (`#[sqlx(…)]`) or imported whole (`use sqlx;`).
fn external_crates(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (before, name, after) in idents(code) {
        let before = before.trim_end();
        let after = after.trim_start();
        // `name::…`, or `::name::…`, but not `other::name::…` or `x.name::<T>()`.
        let path_root = after.starts_with("::")
            && match before.strip_suffix("::") {
                None => !before.ends_with('.'),
                Some(b) => !b.trim_end().ends_with(|c: char| is_ident(c) || c == '>'),
            };
        let attribute = before.ends_with("#[") && after.starts_with('(');
        let whole = (before.ends_with("use") || before.ends_with("extern crate"))
            && (after.starts_with(';') || after.starts_with("as "));
        if path_root || attribute || whole {
            found.push(name.to_string());
        }
    }
    found
}

/// Top-level modules named through `crate::…`, grouped imports included
/// (`use crate::{store::jobs, validation::FieldError}`).
fn crate_modules(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (before, name, after) in idents(code) {
        if name != "crate" || before.ends_with('$') {
            continue;
        }
        let Some(rest) = after.trim_start().strip_prefix("::") else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && is_ident(c) => {
                        let end = group[i..]
                            .find(|c| !is_ident(c))
                            .map_or(group.len(), |e| i + e);
                        found.push(group[i..end].to_string());
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let end = rest.find(|c| !is_ident(c)).unwrap_or(rest.len());
            if end > 0 {
                found.push(rest[..end].to_string());
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn src_keeps_its_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );
    let mut found = Vec::new();
    for file in &files {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let code = std::fs::read_to_string(file).unwrap();
        found.extend(violations(&rel, &code));
    }
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}

#[test]
fn the_scan_sees_imports_and_skips_comments_and_strings() {
    let broken = |rel: &str, code: &str| !violations(rel, code).is_empty();
    // Caught.
    assert!(broken("data/archive.rs", "use axum::Router;"));
    assert!(broken("train/worker.rs", "use sqlx::postgres::PgListener;"));
    assert!(broken("models/x.rs", "fn f(p: &::sqlx::PgPool) {}"));
    assert!(broken(
        "auth.rs",
        "use axum::{extract::State, http::Method};"
    ));
    assert!(broken(
        "telemetry.rs",
        "pub async fn f(r: axum::extract::Request) {}"
    ));
    assert!(broken("store/x.rs", "#[derive(Debug)]\nuse http::Method;"));
    assert!(broken(
        "train/x.rs",
        "#[sqlx(rename_all = \"lowercase\")]\nenum E {}"
    ));
    assert!(broken("data/mod.rs", "use crate::{durable, store::jobs};"));
    assert!(broken("data/mod.rs", "use crate::api::error::FieldError;"));
    assert!(broken("models/mod.rs", "let r = crate::api::router;"));
    assert!(broken(
        "serve/mod.rs",
        "use crate::store::models::ModelRow;"
    ));
    assert!(broken("api/jobs.rs", "use sqlx::types::Json;"));
    assert!(broken("data/x.rs", "let q = '\"'; use sqlx::PgPool;"));
    // Not imports.
    assert!(!broken(
        "data/mod.rs",
        "// use axum::Router;\n/* sqlx::query */ fn f() {}"
    ));
    assert!(!broken(
        "main.rs",
        "let f = \"info,sqlx=warn,tower_http=info\";"
    ));
    assert!(!broken("data/mod.rs", "let s = r#\"use crate::store;\"#;"));
    assert!(!broken(
        "train/x.rs",
        "fn f<'a>(s: &'a str) -> crate::data::X {}"
    ));
    assert!(!broken(
        "config.rs",
        "pub fn http_limits(&self) -> crate::api::HttpLimits {}"
    ));
    assert!(!broken(
        "store/jobs.rs",
        "use sqlx::PgPool; pub(crate) fn f() {}"
    ));
    assert!(!broken(
        "api/mod.rs",
        "use axum::Router; use crate::api::error::ApiError;"
    ));
    assert!(!broken(
        "data/x.rs",
        "let http = 1; my::axum::f(); x.tower::<u8>();"
    ));
}
