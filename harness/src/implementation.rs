//! The implementations under test and their profiles
//! (`cases/implementations.yaml`): the kernel, and FUSE daemons that mount
//! the same layer stacks. A profile says which option sets it claims to
//! express and how its upper layer is laid out; the known deviations from
//! the kernel's behaviour live beside the scenarios, one file a chapter, in
//! `cases/deviations/<implementation>/<area>.yaml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::scenario::LoadError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Implementations {
    pub implementations: BTreeMap<String, Profile>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub description: String,
    /// The daemon and its leading arguments; empty for the kernel. A first
    /// word with a `/` is relative to the workspace root.
    #[serde(default)]
    pub command: Vec<String>,
    /// How layers are passed to the daemon.
    #[serde(default)]
    pub style: Style,
    /// Option sets it claims to express; the probe checks the claim.
    #[serde(default)]
    pub option_sets: Vec<String>,
    /// Known differences from the kernel; such trials report "deviates".
    /// Filled from `cases/deviations/<name>/*.yaml`.
    #[serde(skip)]
    pub deviations: Vec<Deviation>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    /// mount(2) of the kernel's overlay.
    #[default]
    Kernel,
    /// `-o lowerdir=…,upperdir=…,workdir=…` like the kernel's options.
    Overlay,
    /// `upper=RW:lower0=RO:…` branches, copy-on-write; whiteouts under
    /// `.unionfs-fuse/` in the upper branch.
    Unionfs,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Deviation {
    /// `<option-set>/<area>/<scenario>`, `*` matching any run of characters.
    pub trial: String,
    /// A piece of the first differing observation.
    pub differs: String,
    /// Why, in one line.
    pub reason: String,
}

impl Implementations {
    /// `cases/implementations.yaml` plus every profile's deviation files.
    pub fn load(cases: &Path) -> Result<Implementations, LoadError> {
        let mut all: Implementations =
            crate::scenario::load_yaml(&cases.join("implementations.yaml"))?;
        let root = cases.join(DEVIATIONS_DIR);
        for (dir, area, file) in deviation_files(&root) {
            let problem = |message: String| LoadError {
                file: file.clone(),
                line: 0,
                column: 0,
                message,
            };
            let Some(profile) = all.implementations.get_mut(&dir) else {
                return Err(problem(format!(
                    "`{dir}` is not an implementation of cases/implementations.yaml"
                )));
            };
            let list: Vec<Deviation> = crate::scenario::load_yaml(&file)?;
            for d in list {
                // The file names the chapter, so a pattern cannot wander off.
                let pattern_area = d.trial.split('/').nth(1).unwrap_or_default();
                if pattern_area != area {
                    return Err(problem(format!(
                        "deviation `{}` is not in chapter `{area}`: patterns here read `<set>/{area}/<scenario>`",
                        d.trial
                    )));
                }
                profile.deviations.push(d);
            }
        }
        Ok(all)
    }
}

/// Below `cases/`: `<implementation>/<area>.yaml`, lists of deviations.
pub const DEVIATIONS_DIR: &str = "deviations";

/// (implementation, area, file) for every deviation file, sorted.
fn deviation_files(root: &Path) -> Vec<(String, String, PathBuf)> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = dir.file_name().to_string_lossy().into_owned();
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = f.path();
            if p.extension().is_some_and(|x| x == "yaml") {
                let area = p
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                out.push((name.clone(), area, p));
            }
        }
    }
    out.sort();
    out
}

impl Profile {
    pub fn is_kernel(&self) -> bool {
        self.style == Style::Kernel
    }

    /// The daemon's argv with a workspace-relative program made absolute.
    pub fn argv(&self, workspace: &Path) -> Vec<String> {
        let mut argv = self.command.clone();
        if let Some(first) = argv.first_mut() {
            if first.contains('/') && !first.starts_with('/') {
                *first = workspace.join(&*first).display().to_string();
            }
        }
        argv
    }

    /// The known deviation this trial's first difference matches, if any.
    pub fn deviation(&self, trial: &str, first_difference: &str) -> Option<&Deviation> {
        self.deviations
            .iter()
            .find(|d| glob(&d.trial, trial) && first_difference.contains(&d.differs))
    }

    /// Deviations declared for this trial at all (to report stale ones).
    pub fn declared_for(&self, trial: &str) -> Option<&Deviation> {
        self.deviations.iter().find(|d| glob(&d.trial, trial))
    }
}

/// `*` matches any run of characters; everything else literally.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// Where the workspace keeps project-local tools (fuse-overlayfs 2.x).
pub fn tools_dir(workspace: &Path) -> PathBuf {
    workspace.join("target/tools")
}

#[cfg(test)]
mod tests {
    use super::glob;
    use rstest::rstest;

    #[rstest]
    #[case("default/copy-up/x", "default/copy-up/x", true)]
    #[case("*/copy-up/*", "samefs/copy-up/chmod", true)]
    #[case("*/copy-up/*", "samefs/rename/chmod", false)]
    #[case("default/*", "samefs/x", false)]
    #[case("*-dir", "a/b/rename-dir", true)]
    fn globs(#[case] p: &str, #[case] t: &str, #[case] m: bool) {
        assert_eq!(glob(p, t), m);
    }
}
