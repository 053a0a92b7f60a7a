//! Comparing a kernel without baselines against the nearest older kernel's:
//! every pending snapshot `<scenario>@kernel-X.Y-<set>.snap.new` is set
//! against `<scenario>@kernel-<older>-<set>.snap`, scenario by scenario.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `6.12` < `6.18` < `7.0`: kernel labels ordered numerically.
pub fn version_key(label: &str) -> Vec<u64> {
    label.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

/// One snapshot file's name split into (scenario, implementation, kernel, set).
pub fn parse_name(file_name: &str) -> Option<(String, String, String, String)> {
    let stem = file_name
        .strip_suffix(".snap.new")
        .or_else(|| file_name.strip_suffix(".snap"))?;
    let (scenario, rest) = stem.split_once('@')?;
    // The implementation may contain dashes; the kernel is the first part
    // that starts with a digit.
    let parts: Vec<&str> = rest.split('-').collect();
    let k = parts
        .iter()
        .position(|p| p.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    Some((
        scenario.into(),
        parts[..k].join("-"),
        parts[k].into(),
        parts[k + 1..].join("-"),
    ))
}

/// The snapshot's body, without insta's header.
fn body(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    match text
        .strip_prefix("---\n")
        .and_then(|t| t.split_once("\n---\n"))
    {
        Some((_, body)) => body.to_string(),
        None => text,
    }
}

pub struct Comparison {
    pub scenario: String,
    pub set: String,
    pub against: Option<String>,
    /// Empty when identical.
    pub diff: String,
}

/// (area directory, scenario, option set) -> kernel version -> (label, baseline file).
type Baselines = BTreeMap<(PathBuf, String, String), BTreeMap<Vec<u64>, (String, PathBuf)>>;

/// For every pending snapshot of `kernel` (implementation `kernel`) in
/// `cases`, the diff against the nearest older kernel's baseline.
pub fn compare(cases: &Path, kernel: &str) -> Vec<Comparison> {
    // (area-dir, scenario, set) -> kernel -> path of the baseline
    let mut baselines: Baselines = BTreeMap::new();
    let mut pending = Vec::new();
    let mut dirs = vec![cases.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((scenario, implementation, k, set)) = parse_name(&name) else {
                continue;
            };
            if implementation != "kernel" {
                continue;
            }
            let key = (d.clone(), scenario, set);
            if name.ends_with(".snap.new") && k == kernel {
                pending.push((key, p));
            } else if name.ends_with(".snap") {
                baselines
                    .entry(key)
                    .or_default()
                    .insert(version_key(&k), (k, p));
            }
        }
    }
    pending.sort();
    let want = version_key(kernel);
    pending
        .into_iter()
        .map(|(key, path)| {
            let older = baselines
                .get(&key)
                .and_then(|m| m.range(..want.clone()).next_back().map(|(_, v)| v.clone()));
            let (against, diff) = match older {
                Some((k, base)) => {
                    let (a, b) = (body(&base), body(&path));
                    let diff = if a == b {
                        String::new()
                    } else {
                        similar::TextDiff::from_lines(&a, &b)
                            .unified_diff()
                            .header(&format!("kernel {k}"), &format!("kernel {kernel}"))
                            .to_string()
                    };
                    (Some(k), diff)
                }
                None => (None, String::new()),
            };
            Comparison {
                scenario: format!(
                    "{}/{}",
                    key.0
                        .parent()
                        .and_then(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    key.1
                ),
                set: key.2,
                against,
                diff,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            parse_name("a-b@fuse-overlayfs-rs-6.18-nfs_export.snap"),
            Some((
                "a-b".into(),
                "fuse-overlayfs-rs".into(),
                "6.18".into(),
                "nfs_export".into()
            ))
        );
        assert_eq!(
            parse_name("x@kernel-6.1-default.snap.new").map(|n| n.2),
            Some("6.1".into())
        );
        assert!(version_key("6.12") > version_key("6.1"));
        assert!(version_key("6.18") > version_key("6.12"));
    }
}
