//! The documentation holds together: every relative link in the README and `docs/` reaches a
//! file (and, with `#anchor`, a heading of it), and the README's layout names the tree as it is.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The text outside fenced code blocks.
fn prose(text: &str) -> String {
    let mut fenced = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The targets of `[text](target)` and `![alt](target)` links.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
    out
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(page: &Path) -> BTreeSet<String> {
    prose(&std::fs::read_to_string(page).unwrap())
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

#[test]
fn every_relative_link_reaches_its_file_and_heading() {
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for target in links(&prose(&text)) {
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let dest = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            assert!(
                dest.exists(),
                "{}: `{target}` does not exist",
                page.display()
            );
            if let Some(anchor) = anchor {
                assert!(
                    anchors(&dest).contains(anchor),
                    "{}: `{target}`: no such heading in {}",
                    page.display(),
                    dest.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} links found");
}

#[test]
fn the_readme_layout_is_the_tree() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let block = readme
        .split("## Layout")
        .nth(1)
        .and_then(|s| s.split("```").nth(1))
        .expect("a Layout section with a code block");
    // Top-level entries at the margin, `src/`'s indented under it.
    let (mut top, mut src) = (BTreeSet::new(), BTreeSet::new());
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let indent = line.len() - line.trim_start().len();
        let names = line.trim_start().split("  ").next().unwrap();
        match indent {
            0 => {
                top.insert(names.split('/').next().unwrap().to_string());
            }
            // `src/`'s entries; deeper lines continue a description
            2 => src.extend(
                names
                    .split(", ")
                    .map(|n| n.trim().trim_end_matches('/').to_string()),
            ),
            _ => {}
        }
    }
    let listed = |dir: &Path, skip: &[&str]| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_dir() || dir.ends_with("src"))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.') && !skip.contains(&n.as_str()))
            .collect()
    };
    // build outputs and the GPU check's pack (bench/gpu/prepare), all ignored by git
    assert_eq!(top, listed(root(), &["target", "bench-data", "gpu-check"]));
    assert_eq!(src, listed(&root().join("src"), &[]));
}
