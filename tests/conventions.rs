//! Conventions the code keeps: every section sign says which document it
//! points into, the privacy policy ("policy" before it) or the enforcement
//! spec ("spec" before it), or names an RFC.

use std::path::Path;

/// The section sign, spelt so that this file does not trip its own check.
const SECTION: char = '\u{a7}';

fn visit(dir: &Path, out: &mut Vec<(String, usize, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            visit(&path, out);
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(i) = rest.find(SECTION) {
                let before = rest[..i].trim_end().to_ascii_lowercase();
                let named = before.ends_with("policy")
                    || before.ends_with("spec")
                    || before
                        .rsplit(' ')
                        .nth(1)
                        .is_some_and(|w| w.eq_ignore_ascii_case("rfc"));
                if !named {
                    out.push((path.display().to_string(), n + 1, line.to_string()));
                }
                rest = &rest[i + SECTION.len_utf8()..];
            }
        }
    }
}

#[test]
fn every_section_sign_names_its_document() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut unnamed = Vec::new();
    for dir in ["src", "tests", "benches", "examples", "config", "scripts"] {
        visit(&root.join(dir), &mut unnamed);
    }
    assert!(
        unnamed.is_empty(),
        "write `policy {SECTION}N` or `spec {SECTION}N`:\n{}",
        unnamed
            .iter()
            .map(|(f, n, l)| format!("{f}:{n}: {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
