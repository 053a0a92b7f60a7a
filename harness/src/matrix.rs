//! `cases/matrix.yaml`: the named mount-option sets every scenario runs under.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::scenario::LoadError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Matrix {
    pub option_sets: BTreeMap<String, OptionSet>,
    #[serde(skip)]
    pub sets: BTreeMap<String, OptionSet>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OptionSet {
    pub description: String,
    /// Mount options added for this set.
    #[serde(default)]
    pub options: Vec<String>,
    /// Where the layers live.
    #[serde(default)]
    pub placement: Placement,
    /// Mount from inside a fresh user namespace (unprivileged overlay).
    #[serde(default)]
    pub userns: bool,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Each layer on its own filesystem (upper and work share one).
    #[default]
    Separate,
    /// All layers on one filesystem.
    Samefs,
}

impl OptionSet {
    /// The xattr namespace of overlay's private xattrs under this set.
    pub fn xattr_prefix(&self) -> &'static str {
        if self.options.iter().any(|o| o == "userxattr") {
            "user."
        } else {
            "trusted."
        }
    }
}

impl Matrix {
    pub fn load(path: &Path) -> Result<Matrix, LoadError> {
        let mut m: Matrix = crate::scenario::load_yaml(path)?;
        m.sets = m.option_sets.clone();
        Ok(m)
    }
}
