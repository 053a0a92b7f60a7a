//! The corpus of broken scenarios in `tests/broken/`: each file's first line
//! says `# expect: LINE:COLUMN: message-prefix`, and loading it must fail with
//! exactly that position and message. Then a whole run with a broken file
//! among good ones: the broken one fails by name, the rest still run.

use std::path::{Path, PathBuf};
use std::process::Command;

use ovlconf::matrix::Matrix;
use ovlconf::scenario::{self, Vocabulary};
use ovlconf::spec::SpecIds;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn each_broken_scenario_names_its_line_and_column() {
    let cases = workspace().join("cases");
    let ids = SpecIds::load(&cases.join("BEHAVIOURS.md")).unwrap();
    let matrix = Matrix::load(&cases.join("matrix.yaml")).unwrap();
    let features = ovlconf::probe::feature_names();
    let vocab = Vocabulary {
        spec_ids: &ids,
        matrix: &matrix,
        features: &features,
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/broken");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 15, "the corpus shrank");
    let mut problems = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let want = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .expect("first line: # expect: L:C: message");
        match scenario::load(f, &dir, &vocab) {
            Ok(_) => problems.push(format!("{}: loaded, expected an error", f.display())),
            Err(e) => {
                let got = e.to_string();
                let prefix = format!("{}:", f.display());
                assert!(got.starts_with(&prefix), "{got} does not name the file");
                let rest = &got[prefix.len()..];
                if !rest.starts_with(want) {
                    problems.push(format!(
                        "{}:\n  expected {want}\n  got      {rest}",
                        f.display()
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Copy matrix, spec and one real scenario into a scratch workspace, add
/// two broken files, and run the suite binary on it.
#[test]
fn a_broken_scenario_fails_alone_and_the_rest_still_runs() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to mount");
        return;
    }
    let ws = tempfile::tempdir().unwrap();
    let cases = ws.path().join("cases");
    std::fs::create_dir_all(cases.join("whiteout")).unwrap();
    std::fs::create_dir_all(cases.join("broken")).unwrap();
    let real = workspace().join("cases");
    for f in ["BEHAVIOURS.md", "matrix.yaml"] {
        std::fs::copy(real.join(f), cases.join(f)).unwrap();
    }
    // The kernel only: this test is about loading, not about FUSE daemons.
    std::fs::write(
        cases.join("implementations.yaml"),
        "implementations:\n  kernel:\n    description: the running kernel\n",
    )
    .unwrap();
    std::fs::copy(
        real.join("whiteout/unlink-lower-file.yaml"),
        cases.join("whiteout/unlink-lower-file.yaml"),
    )
    .unwrap();
    let broken = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/broken");
    for f in ["unknown-key.yaml", "dotdot-path.yaml"] {
        std::fs::copy(broken.join(f), cases.join("broken").join(f)).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ovlconf"))
        .args(["run", "--", "--test-threads", "2"])
        .env("OVLCONF_ROOT", ws.path())
        .env("OVLCONF_RESULTS", ws.path().join("results.json"))
        .env("CI", "true")
        .env("INSTA_UPDATE", "no")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stdout = format!(
        "{stdout}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "a broken scenario must fail the run:\n{stdout}"
    );
    let good_ran = stdout.lines().any(|l| {
        l.starts_with("test kernel/")
            && l.contains("/default/whiteout/unlink-lower-file")
            && l.ends_with(" ok")
    });
    assert!(
        good_ran,
        "the good scenario did not run and pass:\n{stdout}"
    );
    assert!(
        stdout.contains("cases/broken/unknown-key.yaml:6:22: unknown field `colour`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cases/broken/dotdot-path.yaml:6:18:"),
        "{stdout}"
    );
    assert!(stdout.contains("`..` leaves the layer"), "{stdout}");
    // Nothing was mounted for the broken ones, and nothing is left mounted.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains("/tmp/ovlconf"),
        "a trial mount leaked into the host namespace"
    );
}
