//! Stage 7, report: the per-run results file, written after every run.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
    /// Differs from the kernel in a way the implementation's profile declares.
    Deviates,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialResult {
    pub name: String,
    pub status: Status,
    /// Why it failed or was skipped; for a pass, notes such as a new snapshot.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub covers: Vec<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub kernel: String,
    pub kernel_release: String,
    pub trials: Vec<TrialResult>,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub deviating: usize,
}

impl Results {
    pub fn new(kernel: &str, release: &str, mut trials: Vec<TrialResult>) -> Results {
        trials.sort_by(|a, b| a.name.cmp(&b.name));
        let count = |s: Status| trials.iter().filter(|t| t.status == s).count();
        Results {
            kernel: kernel.into(),
            kernel_release: release.into(),
            passed: count(Status::Pass),
            failed: count(Status::Fail),
            skipped: count(Status::Skip),
            deviating: count(Status::Deviates),
            trials,
        }
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }
}

/// `$OVLCONF_RESULTS`, else `target/ovlconf/results.json` in the workspace.
pub fn results_path(workspace: &Path) -> PathBuf {
    match std::env::var_os("OVLCONF_RESULTS") {
        Some(p) => PathBuf::from(p),
        None => workspace.join("target/ovlconf/results.json"),
    }
}
