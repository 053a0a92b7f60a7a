//! The committed scenario schema (`cases/scenario.schema.json`) matches the
//! Rust types, and every scenario file validates against it.
//!
//! Regenerate after changing the YAML shapes in `harness/src/scenario.rs`:
//!
//! ```sh
//! OVLCONF_UPDATE_SCHEMA=1 cargo test --test schema
//! ```

use std::path::{Path, PathBuf};

/// Files under `cases/` that are YAML but not scenarios.
const NOT_SCENARIOS: &[&str] = &["matrix.yaml", "implementations.yaml", "unsupported.yaml"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn committed_schema_is_current() {
    let path = root().join(ovlconf::schema::SCHEMA_PATH);
    let fresh = ovlconf::schema::scenario_schema();
    if std::env::var_os("OVLCONF_UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        eprintln!("wrote {}", path.display());
        return;
    }
    let Ok(committed) = std::fs::read_to_string(&path) else {
        panic!(
            "{} is missing. Write it with:\n\n    OVLCONF_UPDATE_SCHEMA=1 cargo test --test schema\n",
            path.display()
        );
    };
    if committed != fresh {
        let first = committed
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(fresh.lines().count()));
        panic!(
            "{} is out of date with harness/src/scenario.rs (first difference at line {}).\n\
             Update it with:\n\n    OVLCONF_UPDATE_SCHEMA=1 cargo test --test schema\n",
            path.display(),
            first + 1
        );
    }
}

fn scenario_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            // Deviation lists are not scenarios.
            if p.file_name().is_some_and(|n| n == "deviations") {
                continue;
            }
            scenario_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml")
            && !NOT_SCENARIOS.contains(&p.file_name().unwrap().to_str().unwrap())
        {
            out.push(p);
        }
    }
}

/// Validates one YAML text against the generated schema; the error strings
/// name the JSON pointer of each problem.
///
/// Untyped, serde-saphyr would read YAML 1.1 booleans (`y`, `n`, `on`, ...);
/// with `strict_booleans` it follows YAML 1.2 as editors' YAML language
/// server does, so `opaque: y` or `fd: f` stay strings.
fn validate(validator: &jsonschema::Validator, text: &str) -> Result<(), Vec<String>> {
    let options = serde_saphyr::options! { strict_booleans: true };
    let value: serde_json::Value = serde_saphyr::from_str_with_options(text, options)
        .map_err(|e| vec![format!("YAML: {e}")])?;
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn validator() -> jsonschema::Validator {
    jsonschema::validator_for(&ovlconf::schema::scenario_schema_value()).expect("schema compiles")
}

#[test]
fn every_scenario_validates() {
    let validator = validator();
    let mut files = Vec::new();
    scenario_files(&root().join("cases"), &mut files);
    assert!(
        files.len() > 10,
        "found only {} scenario files",
        files.len()
    );
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        if let Err(errors) = validate(&validator, &text) {
            for e in errors {
                bad.push(format!(
                    "{}: {e}",
                    f.strip_prefix(root()).unwrap_or(f).display()
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} problem(s):\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn schema_rejects_what_the_loader_rejects() {
    let validator = validator();
    // A typo in a key: deny_unknown_fields becomes additionalProperties: false.
    let typo = "description: x\ncovers: [WH-01]\nlayers: {lower: [{a: {file: x}}]}\nstep: []\n";
    assert!(validate(&validator, typo).is_err());
    // A wrong enum value.
    let fs = "description: x\ncovers: []\nfs: zfs\nlayers: {}\n";
    assert!(validate(&validator, fs).is_err());
    // Missing required keys.
    assert!(validate(&validator, "covers: []\nlayers: {}\n").is_err());
    // The minimal valid file, with a renamed key (`as`) and a `type` key.
    let ok = "description: x\ncovers: [WH-01]\nlayers: {lower: [{a: {file: x, mode: 0o644}}]}\n\
              steps:\n  - stat: {path: a, type: file}\n    as: {uid: 1, gid: 1}\n    expect: EACCES\n";
    validate(&validator, ok).unwrap();
}
