//! The numbers in BENCHMARKS.md and the README's defaults table come from the committed result
//! files: regenerating them changes nothing.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn benchmarks_md_is_generated_from_the_results() {
    let expected = hylo_benches::results::benchmarks_md(&repo().join("benches/results")).unwrap();
    let committed = std::fs::read_to_string(repo().join("BENCHMARKS.md")).unwrap();
    assert!(
        committed == expected,
        "BENCHMARKS.md is not `hylo-bench --markdown benches/results`'s output: regenerate it"
    );
}

#[test]
fn the_readmes_defaults_table_is_the_convergence_results() {
    let table =
        hylo_benches::results::readme_table(&repo().join("benches/results/convergence.json"))
            .unwrap();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let begin = "<!-- defaults:begin -->\n";
    let start = readme.find(begin).expect("defaults markers") + begin.len();
    let end = readme
        .find("<!-- defaults:end -->")
        .expect("defaults end marker");
    assert_eq!(
        &readme[start..end],
        table,
        "README.md's defaults table is not the one of benches/results/convergence.json: \
         regenerate it with hylo-bench --readme-table benches/results/convergence.json"
    );
}

#[test]
fn every_result_file_has_its_section() {
    let dir = repo().join("benches/results");
    let md = hylo_benches::results::benchmarks_md(&dir).unwrap();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") {
            files += 1;
            assert!(
                // A section heading names its file (the summary's prose may name it too).
                md.lines()
                    .any(|l| l.starts_with("## ") && l.contains(&format!("`{name}`"))),
                "benches/results/{name} has no section in BENCHMARKS.md: render it in results.rs"
            );
        }
    }
    assert!(files >= 5, "only {files} result files in benches/results");
    assert!(
        !dir.join("earlier.md").exists(),
        "figures typed by hand belong in result files"
    );
}
