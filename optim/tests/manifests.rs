//! What a project that depends on the library gets from its manifests: any Burn 0.21 release
//! (not one exact patch), no Burn features the library does not use, the fast CPU backend by
//! default, and a dev profile without dependencies' debug checks (the demo is timed with it).
#![allow(clippy::disallowed_methods)] // Tests and examples read the device freely.

fn manifest(path: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The line of `text` that starts with `key` (after spaces) inside the `[section]` table.
fn entry<'a>(text: &'a str, section: &str, key: &str) -> Option<&'a str> {
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == format!("[{section}]");
            continue;
        }
        if inside && line.starts_with(key) {
            return Some(line);
        }
    }
    None
}

#[test]
fn burn_is_any_0_21_release_without_the_dataset_feature_for_the_library() {
    let workspace = manifest("../Cargo.toml");
    for key in ["burn =", "burn-flex ="] {
        let line = entry(&workspace, "workspace.dependencies", key).expect(key);
        assert!(line.contains("version = \"0.21\""), "{line}");
        assert!(!line.contains("\"=0.21"), "an exact pin: {line}");
    }
    let burn = entry(&workspace, "workspace.dependencies", "burn =").unwrap();
    assert!(!burn.contains("dataset"), "{burn}");
    for crate_dir in [".", "../models"] {
        let own = manifest(&format!("{crate_dir}/Cargo.toml"));
        let line = entry(&own, "dependencies", "burn =").expect("burn");
        assert!(!line.contains("dataset"), "{crate_dir}: {line}");
    }
    let datasets = manifest("../datasets/Cargo.toml");
    let line = entry(&datasets, "dependencies", "burn =").unwrap();
    assert!(
        line.contains("dataset"),
        "hylo-datasets uses Burn's DataLoader: {line}"
    );
}

#[test]
fn the_library_builds_the_fast_cpu_backend_by_default() {
    let own = manifest("Cargo.toml");
    assert_eq!(
        entry(&own, "features", "default ="),
        Some("default = [\"fast-cpu\"]")
    );
    assert_eq!(
        entry(&own, "features", "fast-cpu ="),
        Some("fast-cpu = [\"dep:burn-flex\"]")
    );
    let workspace = manifest("../Cargo.toml");
    let flex = entry(&workspace, "workspace.dependencies", "burn-flex =").unwrap();
    assert!(
        flex.contains("\"simd\"") && flex.contains("\"rayon\""),
        "{flex}"
    );
    let dep = entry(&own, "dependencies", "burn-flex =").unwrap();
    assert!(
        dep.contains("workspace = true") && dep.contains("optional = true"),
        "{dep}"
    );
}

#[test]
fn dependencies_build_without_debug_checks_in_the_dev_profile() {
    let workspace = manifest("../Cargo.toml");
    let section = "profile.dev.package.\"*\"";
    assert_eq!(
        entry(&workspace, section, "opt-level"),
        Some("opt-level = 3")
    );
    assert_eq!(
        entry(&workspace, section, "debug-assertions"),
        Some("debug-assertions = false")
    );
    assert_eq!(
        entry(&workspace, section, "overflow-checks"),
        Some("overflow-checks = false")
    );
}
