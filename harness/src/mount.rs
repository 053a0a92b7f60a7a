//! Stage 3, mount: the overlay option string, mount(2) and umount, and what
//! the kernel reports back in mountinfo and the module parameters.

use std::collections::BTreeMap;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::errno;
use crate::layers::Stack;
use crate::matrix::OptionSet;
use crate::scenario::{MountSpec, Outcome};

/// The option string for this stack, option set and scenario.
pub fn options(stack: &Stack, set: &OptionSet, spec: &MountSpec) -> String {
    if let Some(raw) = &spec.raw {
        return expand(raw, stack);
    }
    let mut opts = Vec::new();
    let mut lower: Vec<String> = stack
        .lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    if !stack.data.is_empty() {
        // Data-only layers follow a double colon, each separated by `::`.
        let data: Vec<String> = stack.data.iter().map(|p| p.display().to_string()).collect();
        lower.push(String::new());
        lower.push(data.join("::"));
    }
    if !stack.lowers.is_empty() || !stack.data.is_empty() {
        opts.push(format!("lowerdir={}", lower.join(":")));
    }
    if let (Some(u), Some(w)) = (&stack.upper, &stack.work) {
        opts.push(format!("upperdir={}", u.display()));
        opts.push(format!("workdir={}", w.display()));
    }
    opts.extend(set.options.iter().cloned());
    opts.extend(spec.options.iter().map(|o| expand(o, stack)));
    opts.join(",")
}

/// `$LOWER0`, `$UPPER`, `$WORK`, `$DATA0`, `$MERGED`, `$ROOT` -> paths.
fn expand(s: &str, stack: &Stack) -> String {
    let mut out = s.to_string();
    // Longest names first so `$LOWER10` is not read as `$LOWER1` + `0`.
    for (i, p) in stack.lowers.iter().enumerate().rev() {
        out = out.replace(&format!("$LOWER{i}"), &p.display().to_string());
    }
    for (i, p) in stack.data.iter().enumerate().rev() {
        out = out.replace(&format!("$DATA{i}"), &p.display().to_string());
    }
    if let Some(u) = &stack.upper {
        out = out.replace("$UPPER", &u.display().to_string());
    }
    if let Some(w) = &stack.work {
        out = out.replace("$WORK", &w.display().to_string());
    }
    out = out.replace("$MERGED", &stack.merged.display().to_string());
    out.replace("$ROOT", &stack.root.display().to_string())
}

/// mount(2) the overlay at the stack's merged dir.
pub fn mount_overlay(stack: &Stack, opts: &str) -> Outcome {
    match mount(
        Some("overlay"),
        &stack.merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts),
    ) {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::Err(errno::name(e as i32)),
    }
}

pub fn unmount(target: &Path) -> nix::Result<()> {
    umount2(target, MntFlags::empty())
}

/// The super options of the mount at `target`, as the kernel shows them.
pub fn mountinfo_options(target: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = target.display().to_string();
    // Several mounts may stack on one point; the last line is the top one.
    let line = text
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .last()?;
    let (_, tail) = line.split_once(" - ")?;
    let mut parts = tail.splitn(3, ' ');
    let _fstype = parts.next()?;
    let _source = parts.next()?;
    let opts = parts.next()?;
    Some(opts.split(',').map(|s| s.to_string()).collect())
}

/// /sys/module/overlay/parameters: the defaults the mount started from.
pub fn module_params() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/sys/module/overlay/parameters") {
        for e in dir.flatten() {
            if let Ok(v) = std::fs::read_to_string(e.path()) {
                out.insert(
                    e.file_name().to_string_lossy().into_owned(),
                    v.trim().to_string(),
                );
            }
        }
    }
    out
}
