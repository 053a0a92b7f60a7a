//! The HTML matrix (`ovlconf::html`): a synthetic run rendered to
//! `target/ovlconf/html-check.html` (which `ci/check-html-report` loads in a
//! headless browser), and the workspace's own results files, when present,
//! rendered to `target/ovlconf/html-results.html`.

use std::path::{Path, PathBuf};

use ovlconf::report::{Results, Status, TrialResult};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Built through serde, as a results file is read, so fields added to
/// `TrialResult` later (with serde defaults) need no change here.
fn trial(name: &str, status: Status, reason: &str, covers: &[&str]) -> TrialResult {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "status": status,
        "reason": reason,
        "covers": covers,
        "duration_ms": 7,
    }))
    .expect("a trial result")
}

/// Two kernels, two implementations, three option sets, every status, a
/// load failure and hostile text in names and reasons.
fn synthetic() -> Vec<Results> {
    use Status::*;
    let mut host = Vec::new();
    for imp in ["kernel", "fuse-overlayfs"] {
        for set in ["default", "metacopy", "xino"] {
            host.push(trial(
                &format!("{imp}/6.18/{set}/whiteout/unlink-lower-file"),
                Pass,
                "",
                &["WH-01", "WH-02"],
            ));
            host.push(trial(
                &format!("{imp}/6.18/{set}/copy-up/chmod-lower-file"),
                if imp == "kernel" { Pass } else { Deviates },
                if imp == "kernel" {
                    "new snapshot chmod-lower-file@kernel-6.18-default pending review"
                } else {
                    "deviates as declared: upper/f mode 0644 instead of 0600"
                },
                &["CU-01"],
            ));
        }
    }
    host.push(trial(
        "kernel/6.18/xino/rename/<b>odd\"name'</b>",
        Skip,
        "needs feature `xino` <i>",
        &[],
    ));
    host.push(trial(
        "parse/rename/broken",
        Fail,
        "cases/rename/broken.yaml:3:1: unknown field `stepz`",
        &[],
    ));
    // The first cell of the matrix (kernel 6.1 sorts before 6.18, area
    // `copy-up` first) fails with markup in its reason: the self-test of
    // ci/check-html-report reads it back from the page.
    let vm = vec![
        trial("kernel/6.1/default/whiteout/unlink-lower-file", Skip, "needs feature `metacopy`", &["WH-01"]),
        trial(
            "kernel/6.1/default/copy-up/chmod-lower-file",
            Fail,
            "cases/copy-up/chmod-lower-file.yaml: 1 expectation(s) not met:\n  - upper `f`: expected mode 0600, got 0644 </script><b>&amp;</b>",
            &["CU-01"],
        ),
    ];
    vec![
        Results::new("6.18", "6.18.44-test", host),
        Results::new("6.1", "6.1.0-56-amd64", vm),
    ]
}

#[test]
fn synthetic_page() {
    let results = synthetic();
    let page = ovlconf::html::render(&results);

    // Deterministic: the same input in another order gives the same bytes.
    let mut reversed = results.clone();
    reversed.reverse();
    for r in &mut reversed {
        r.trials.reverse();
    }
    assert_eq!(page, ovlconf::html::render(&reversed));

    // 3 sets × 2 implementations on 6.18, 1 combination on 6.1; 3 scenarios.
    assert_eq!(page.matches("<th class=\"impl\"").count(), 7);
    assert_eq!(page.matches("<th class=\"row\"").count(), 3);
    assert_eq!(page.matches("<td class=\"cell ").count(), 21);
    assert_eq!(page.matches("<td class=\"cell none\"").count(), 6);
    assert_eq!(page.matches("<td class=\"cell fail\"").count(), 1);
    assert_eq!(page.matches("<td class=\"cell deviates\"").count(), 3);

    // Nothing from the data reaches the page unescaped.
    assert!(!page.contains("<b>odd"));
    assert!(page.contains("&lt;b&gt;odd&quot;name&#39;&lt;/b&gt;"));
    assert_eq!(
        page.matches("</script>").count(),
        2,
        "only the two real script ends"
    );
    assert!(!page.contains("<i>"));
    // Self-contained.
    for external in ["src=", "href=", "@import", "url("] {
        assert!(
            !page.contains(external),
            "page refers to an external resource: {external}"
        );
    }
    // The load failure is listed below the matrix.
    assert!(page.contains("<code>parse/rename/broken</code>"));

    let out = root().join("target/ovlconf/html-check.html");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, &page).unwrap();
    eprintln!("wrote {}", out.display());
}

/// The workspace's host and VM results, if any, as `ovlconf html` would
/// render them: every scenario trial is one cell.
#[test]
fn workspace_results_page() {
    let files = ovlconf::report::results_files(&root());
    let runs: Vec<Results> = files
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    if runs.is_empty() {
        eprintln!("no results files; nothing to render");
        return;
    }
    let page = ovlconf::html::render(&runs);
    let mut names: Vec<&str> = runs
        .iter()
        .flat_map(|r| r.trials.iter().map(|t| t.name.as_str()))
        .collect();
    names.sort();
    names.dedup();
    let scenario_trials = names
        .iter()
        .filter(|n| n.split('/').count() >= 5 && !n.starts_with("parse/"))
        .count();
    assert_eq!(
        page.matches("<td class=\"cell ").count() - page.matches("<td class=\"cell none\"").count(),
        scenario_trials
    );
    let out = root().join("target/ovlconf/html-results.html");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, &page).unwrap();
    eprintln!(
        "wrote {} from {} results file(s)",
        out.display(),
        runs.len()
    );
}
