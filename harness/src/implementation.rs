//! The implementations under test and their profiles
//! (`cases/implementations.yaml`): the kernel, and FUSE daemons that mount
//! the same layer stacks. A profile says which option sets it claims to
//! express, how its upper layer is laid out, and which deviations from the
//! kernel's behaviour are known.

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
    #[serde(default)]
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
    pub fn load(path: &Path) -> Result<Implementations, LoadError> {
        crate::scenario::load_yaml(path)
    }
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
