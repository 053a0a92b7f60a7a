//! `cases/BEHAVIOURS.md` is the project's copy of the spec; where the shared
//! original sits beside the checkout, the copy must not have drifted.

use std::path::Path;

#[test]
fn spec_copy_matches_the_shared_spec() {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let shared = ws.join("../shared/spec/BEHAVIOURS.md");
    let Ok(original) = std::fs::read_to_string(&shared) else {
        eprintln!("no {} here; nothing to compare", shared.display());
        return;
    };
    let copy = std::fs::read_to_string(ws.join("cases/BEHAVIOURS.md")).unwrap();
    assert!(
        copy == original,
        "cases/BEHAVIOURS.md differs from {}: copy it again",
        shared.display()
    );
}
