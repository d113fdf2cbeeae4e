//! Every `§N` / `§N.N` reference in the repository's sources names a section of
//! `docs/custom-handler-protocol.md`, so no reference points at a document outside the repo.
//!
//! A section exists when the document has a Markdown heading that starts with its number:
//! `## 3. HTTP trigger` defines `3`, `### 3.2 Envelope form` defines `3.2`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const PROTOCOL_DOC: &str = "docs/custom-handler-protocol.md";
/// The folders whose files may cite the protocol document.
const SCANNED: [&str; 5] = ["src", "devtools", "tests", "bench", "docs"];
/// Build output and installed tools: not our sources.
const SKIPPED_DIRS: [&str; 4] = ["target", "node_modules", ".devhost", "tools"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Section numbers defined by the document's headings.
fn sections(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix('#')?.trim_start_matches('#').trim_start();
            let number: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let number = number.trim_end_matches('.');
            (!number.is_empty()).then(|| number.to_string())
        })
        .collect()
}

/// `§` references in a text: `§5`, `§5.3`, `§1.2-§1.5` gives `1.2` and `1.5`.
/// A trailing period ends a sentence, it is not part of the number.
fn references(text: &str) -> Vec<String> {
    text.split('§')
        .skip(1)
        .filter_map(|after| {
            let number: String = after
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let number = number.trim_end_matches('.');
            (!number.is_empty()).then(|| number.to_string())
        })
        .collect()
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if !SKIPPED_DIRS.iter().any(|s| name == *s) {
                source_files(&path, out);
            }
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("rs" | "md" | "py" | "sh")
        ) {
            out.push(path);
        }
    }
}

#[test]
fn every_section_reference_in_the_sources_names_a_section_of_the_protocol_document() {
    let doc = std::fs::read_to_string(root().join(PROTOCOL_DOC)).expect("protocol document");
    let defined = sections(&doc);
    let mut files = Vec::new();
    for dir in SCANNED {
        source_files(&root().join(dir), &mut files);
    }
    let mut cited = 0;
    let mut dangling = Vec::new();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for reference in references(&text) {
            cited += 1;
            if !defined.contains(&reference) {
                dangling.push(format!(
                    "{}: §{reference}",
                    file.strip_prefix(root()).unwrap_or(file).display()
                ));
            }
        }
    }
    assert!(
        cited > 30,
        "expected the sources to cite the protocol document, found {cited} references"
    );
    assert!(
        dangling.is_empty(),
        "references to sections {PROTOCOL_DOC} does not have:\n{}",
        dangling.join("\n")
    );
}

#[test]
fn section_numbers_are_read_from_headings_and_references_from_text() {
    let doc =
        "# Title\n## 1. Lifecycle\n### 1.5 Exit\ntext about 2.2\n## 8. Pitfalls\n### 8.15 Query\n";
    assert_eq!(
        sections(doc),
        ["1", "1.5", "8", "8.15"].map(String::from).into()
    );
    assert_eq!(
        references("see §1.2-§1.5, and §6. Also §8.15)"),
        ["1.2", "1.5", "6", "8.15"].map(String::from).to_vec()
    );
}
