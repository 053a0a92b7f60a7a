//! Fuzz target for the scenario loader: arbitrary bytes go to
//! `ovlconf::scenario::parse` as if they were a file under `cases/`.
//! Errors are fine; a panic, hang or runaway allocation is a bug.
//!
//! Run: `ci/fuzz` (or see the README).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ovlconf::matrix::Matrix;
use ovlconf::scenario::{self, Vocabulary};
use ovlconf::spec::SpecIds;

struct Vocab {
    cases: PathBuf,
    ids: SpecIds,
    matrix: Matrix,
    features: Vec<&'static str>,
}

fn vocab() -> &'static Vocab {
    static V: OnceLock<Vocab> = OnceLock::new();
    V.get_or_init(|| {
        // OVLCONF_CASES overrides; otherwise ../cases relative to this crate.
        let cases = std::env::var_os("OVLCONF_CASES")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../cases"));
        let ids = SpecIds::load(&cases.join("BEHAVIOURS.md"))
            .unwrap_or_else(|e| panic!("{}: {e}", cases.join("BEHAVIOURS.md").display()));
        let matrix = Matrix::load(&cases.join("matrix.yaml"))
            .unwrap_or_else(|e| panic!("{}: {e}", cases.join("matrix.yaml").display()));
        Vocab {
            cases,
            ids,
            matrix,
            features: ovlconf::probe::feature_names(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    // The loader reads files with read_to_string, so non-UTF-8 never reaches parse.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let v = vocab();
    let vocabulary = Vocabulary {
        spec_ids: &v.ids,
        matrix: &v.matrix,
        features: &v.features,
    };
    // A path inside an area, as a real scenario has.
    let path = v.cases.join("whiteout/fuzz.yaml");
    let _ = scenario::parse(&path, text, &v.cases, &vocabulary);
});
