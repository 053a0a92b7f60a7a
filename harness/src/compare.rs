//! Stage 6, compare and snapshot: the scenario's expectations against the
//! observation, then the whole observation against its insta baseline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::observe::{NodeObs, Observation, StepObs};
use crate::probe::Features;
use crate::scenario::{node_kinds, NodeSpec, Op, Outcome, Scenario, TreeExpectSpec, WhenSpec};

/// What a condition is evaluated against.
pub struct TrialContext<'a> {
    pub set_name: &'a str,
    pub implementation: &'a str,
    pub features: &'a Features,
    pub xattr_prefix: &'a str,
    /// Upper-layer expectations describe the kernel's on-disk format; other
    /// implementations have their own, which is snapshotted, not asserted.
    pub check_upper: bool,
}

impl TrialContext<'_> {
    pub fn holds(&self, w: &WhenSpec, mount_options: &[String]) -> bool {
        let has_opt = |o: &String| mount_options.iter().any(|m| m == o);
        (w.sets.is_empty() || w.sets.iter().any(|s| s == self.set_name))
            && !w.not_sets.iter().any(|s| s == self.set_name)
            && w.options.iter().all(has_opt)
            && !w.not_options.iter().any(has_opt)
            && w.features.iter().all(|f| self.features.has(f))
            && !w.not_features.iter().any(|f| self.features.has(f))
            && (w.implementations.is_empty()
                || w.implementations.iter().any(|i| i == self.implementation))
    }

    fn expected(&self, base: &Outcome, conds: &[(WhenSpec, Outcome)], opts: &[String]) -> Outcome {
        conds
            .iter()
            .find(|(w, _)| self.holds(w, opts))
            .map(|(_, o)| o.clone())
            .unwrap_or_else(|| base.clone())
    }
}

/// Every way the observation differs from the scenario, first one first.
pub fn check(sc: &Scenario, obs: &Observation, ctx: &TrialContext) -> Vec<String> {
    let mut out = Vec::new();
    let opts = &obs.mount_options;
    let want = ctx.expected(&sc.mount_expect, &sc.mount_expect_if, opts);
    if let Some(d) = &obs.daemon {
        out.push(format!("the FUSE daemon died: {d}"));
    }
    // A FUSE daemon cannot return an errno from mount: for it, any refusal
    // is what an expected mount error asks for.
    let daemon_refused =
        !ctx.check_upper && matches!(want, Outcome::Err(_)) && obs.mount.starts_with("refused");
    if want.to_string() != obs.mount && !daemon_refused {
        out.push(format!("mount: expected {want}, got {}", obs.mount));
        return out;
    }
    // After a refused mount no step ran; the final blocks still hold (the
    // upper layer as the refusal left it, the fs_context log).
    let steps = if obs.mount == "ok" {
        &sc.steps[..]
    } else {
        &[]
    };
    for (i, step) in steps.iter().enumerate() {
        let at = format!(
            "step {} (line {}) `{}`",
            i + 1,
            step.pos.line,
            step.op.label()
        );
        let Some(got) = obs.steps.get(i) else {
            out.push(format!("{at}: not run"));
            continue;
        };
        let want = ctx.expected(&step.expect, &step.expect_if, opts);
        if want.to_string() != got.outcome {
            out.push(format!("{at}: expected {want}, got {}", got.outcome));
            continue;
        }
        if got.outcome == "ok" {
            step_details(&step.op, got, obs, &at, &mut out);
        }
    }
    for block in &sc.spec.expect {
        let b = &block.value;
        if let Some(w) = &b.when {
            if !ctx.holds(w, opts) {
                continue;
            }
        }
        let at = format!("expect block at line {}", block.referenced.line());
        if let Some(t) = &b.merged {
            tree(
                &format!("{at}: merged"),
                t,
                &obs.merged,
                ctx.xattr_prefix,
                false,
                &mut out,
            );
        }
        if let (Some(t), true) = (&b.upper, ctx.check_upper) {
            tree(
                &format!("{at}: upper"),
                t,
                &obs.upper,
                ctx.xattr_prefix,
                true,
                &mut out,
            );
        }
        for group in &b.same_identity {
            let classes: BTreeSet<Option<&String>> =
                group.iter().map(|n| obs.identities.get(n)).collect();
            if classes.len() != 1 || classes.contains(&None) {
                out.push(format!(
                    "{at}: identities {group:?} should be one object, got {:?}",
                    group
                        .iter()
                        .map(|n| obs.identities.get(n))
                        .collect::<Vec<_>>()
                ));
            }
        }
        for group in &b.different_identity {
            let classes: Vec<Option<&String>> =
                group.iter().map(|n| obs.identities.get(n)).collect();
            let distinct: BTreeSet<_> = classes.iter().collect();
            if distinct.len() != classes.len() || classes.contains(&None) {
                out.push(format!(
                    "{at}: identities {group:?} should all differ, got {classes:?}"
                ));
            }
        }
        if b.dev_uniform == Some(true) {
            for (p, n) in &obs.merged {
                if n.dev.as_deref() != Some("overlay") {
                    out.push(format!(
                        "{at}: st_dev of `{p}` is {:?}, not the overlay's",
                        n.dev
                    ));
                    break;
                }
            }
        }
        if let Some(want) = b.d_ino_matches {
            // Entries where d_ino promises nothing (None) are left out.
            for (p, n) in &obs.merged {
                if n.d_ino_matches.is_some_and(|m| m != want) {
                    out.push(format!(
                        "{at}: d_ino == st_ino for `{p}` is {:?}, expected {want}",
                        n.d_ino_matches
                    ));
                    break;
                }
            }
        }
        for o in &b.mount_options {
            if !opts.contains(o) {
                out.push(format!("{at}: mountinfo lacks `{o}`: {}", opts.join(",")));
            }
        }
        for piece in &b.mount_log {
            if !obs.mount_log.iter().any(|l| l.contains(piece.as_str())) {
                out.push(format!(
                    "{at}: the fs_context log lacks {piece:?}: {:?}",
                    obs.mount_log
                ));
            }
        }
        for (path, want) in &b.work {
            let have = obs.work.get(path);
            if have != want.as_ref() {
                out.push(format!(
                    "{at}: work `{path}` expected {want:?}, got {have:?}"
                ));
            }
        }
        for o in &b.not_mount_options {
            if opts.contains(o) {
                out.push(format!("{at}: mountinfo shows `{o}`"));
            }
        }
    }
    out
}

fn step_details(op: &Op, got: &StepObs, obs: &Observation, at: &str, out: &mut Vec<String>) {
    let mut eq = |what: &str, want: &str, have: Option<&str>| {
        if Some(want) != have {
            out.push(format!("{at}: {what} expected {want:?}, got {have:?}"));
        }
    };
    match op {
        Op::Read(a) => {
            if let Some(d) = &a.data {
                eq("data", d, got.data.as_deref());
            }
        }
        Op::Readlink(a) => {
            if let Some(t) = &a.target {
                eq("target", t, got.data.as_deref());
            }
        }
        Op::Getxattr(a) => {
            if let Some(v) = &a.value {
                eq("value", v, got.data.as_deref());
            }
        }
        Op::ReadMap(a) => {
            if let Some(d) = &a.data {
                eq("mapped data", d, got.data.as_deref());
            }
        }
        Op::Lsattr(a) => {
            if let Some(flags) = &a.flags {
                let want: BTreeSet<&String> = flags.iter().collect();
                let have: BTreeSet<&String> = got.names.iter().flatten().collect();
                if want != have {
                    out.push(format!("{at}: inode flags expected {want:?}, got {have:?}"));
                }
            }
        }
        Op::Syncfs(a) | Op::Fsync(a) => {
            if let Some(want) = a.upper_writes {
                if got.upper_writes != Some(want) {
                    out.push(format!(
                        "{at}: upper device writes expected {want}, got {:?}",
                        got.upper_writes
                    ));
                }
            }
        }
        Op::Listxattr(a) => {
            if let Some(names) = &a.names {
                let want: BTreeSet<&String> = names.iter().collect();
                let have: BTreeSet<&String> = got.names.iter().flatten().collect();
                if want != have {
                    out.push(format!("{at}: xattr names expected {want:?}, got {have:?}"));
                }
            }
        }
        Op::Stat(a) | Op::Lstat(a) => {
            let Some(st) = &got.stat else { return };
            let mut field = |name: &str, want: Option<String>, have: String| {
                if let Some(w) = want {
                    if w != have {
                        out.push(format!("{at}: {name} expected {w}, got {have}"));
                    }
                }
            };
            field("type", a.kind.clone(), st.kind.clone());
            field("mode", a.mode.map(|m| format!("{m:04o}")), st.mode.clone());
            field("uid", a.uid.map(|v| v.to_string()), st.uid.to_string());
            field("gid", a.gid.map(|v| v.to_string()), st.gid.to_string());
            field("size", a.size.map(|v| v.to_string()), st.size.to_string());
            field(
                "nlink",
                a.nlink.map(|v| v.to_string()),
                st.nlink.to_string(),
            );
            field(
                "rdev",
                a.rdev.map(|r| format!("{}:{}", r[0], r[1])),
                st.rdev.clone().unwrap_or_default(),
            );
            field("st_dev class", a.dev.clone(), st.dev.clone());
            field(
                "atime",
                a.atime.map(|t| t.to_string()),
                st.atime.clone().unwrap_or_default(),
            );
            if let Some(other) = &a.same_as {
                match obs.identities.get(other) {
                    Some(c) if *c == st.ino => {}
                    c => out.push(format!(
                        "{at}: expected the same identity as `{other}` ({c:?}), got {}",
                        st.ino
                    )),
                }
            }
            if let Some(other) = &a.differs_from {
                if obs.identities.get(other) == Some(&st.ino) {
                    out.push(format!(
                        "{at}: expected an identity different from `{other}`, got the same ({})",
                        st.ino
                    ));
                }
            }
        }
        Op::Readdir(a) => {
            let entries = got.entries.clone().unwrap_or_default();
            if let Some(want) = &a.entries {
                let have: BTreeMap<&String, &String> = entries
                    .iter()
                    .filter(|(n, _)| *n != "." && *n != "..")
                    .map(|(n, e)| (n, &e.d_type))
                    .collect();
                let want: BTreeMap<&String, &String> = want.iter().collect();
                if want != have {
                    out.push(format!("{at}: entries expected {want:?}, got {have:?}"));
                }
                let from_start = a.path.is_some() || a.rewind;
                for dot in [".", ".."].into_iter().filter(|_| from_start) {
                    if !entries.contains_key(dot) {
                        out.push(format!("{at}: no `{dot}` entry"));
                    }
                }
            }
            if let Some(want) = a.d_ino_matches {
                for (n, e) in &entries {
                    if e.d_ino_matches.is_some_and(|m| m != want) {
                        out.push(format!(
                            "{at}: d_ino == st_ino for `{n}` is {:?}, expected {want}",
                            e.d_ino_matches
                        ));
                    }
                }
            }
        }
        Op::Statfs(a) => {
            let have = got.fsid.as_ref();
            if let Some(other) = &a.same_as {
                if obs.identities.get(&format!("fsid:{other}")) != have {
                    out.push(format!("{at}: f_fsid expected the same as `{other}`"));
                }
            }
            if let Some(other) = &a.differs_from {
                if obs.identities.get(&format!("fsid:{other}")) == have {
                    out.push(format!("{at}: f_fsid expected to differ from `{other}`"));
                }
            }
        }
        _ => {}
    }
}

fn tree(
    at: &str,
    want: &TreeExpectSpec,
    have: &BTreeMap<String, NodeObs>,
    prefix: &str,
    on_disk: bool,
    out: &mut Vec<String>,
) {
    for (path, node) in &want.tree {
        let n = &node.value;
        let obs = have.get(path.trim_end_matches('/'));
        if n.absent == Some(true) {
            if let Some(o) = obs {
                out.push(format!(
                    "{at}: `{path}` should be absent, found a {}",
                    o.kind
                ));
            }
            continue;
        }
        let Some(o) = obs else {
            out.push(format!("{at}: `{path}` is missing"));
            continue;
        };
        for problem in node_problems(n, o, prefix, on_disk) {
            out.push(format!("{at}: `{path}`: {problem}"));
        }
    }
    if want.exact {
        let mut allowed: BTreeSet<String> = BTreeSet::new();
        for p in want.tree.keys() {
            let p = p.trim_end_matches('/');
            let mut acc = String::new();
            for c in p.split('/') {
                if !acc.is_empty() {
                    acc.push('/');
                }
                acc.push_str(c);
                allowed.insert(acc.clone());
            }
        }
        for p in have.keys() {
            if !allowed.contains(p) {
                out.push(format!("{at}: unexpected `{p}` ({})", have[p].kind));
            }
        }
    }
}

fn node_problems(n: &NodeSpec, o: &NodeObs, prefix: &str, on_disk: bool) -> Vec<String> {
    let mut p = Vec::new();
    let kind = node_kinds(n).first().copied();
    let want_kind = match kind {
        Some("size") => Some("file"),
        Some("whiteout") => match n.whiteout {
            Some(crate::scenario::WhiteoutForm::Xattr) => Some("file"),
            _ => Some(if on_disk { "whiteout" } else { "chardev" }),
        },
        k => k,
    };
    if let Some(k) = want_kind {
        if k != o.kind {
            p.push(format!("type expected {k}, got {}", o.kind));
            return p;
        }
    }
    if let Some(c) = &n.file {
        if o.content.as_deref() != Some(c.as_str()) {
            p.push(format!("content expected {c:?}, got {:?}", o.content));
        }
    }
    if let Some(s) = n.size {
        if o.size != Some(s) {
            p.push(format!("size expected {s}, got {:?}", o.size));
        }
    }
    if let Some(t) = &n.symlink {
        if o.target.as_deref() != Some(t.as_str()) {
            p.push(format!("target expected {t:?}, got {:?}", o.target));
        }
    }
    if let Some(mm) = n.chardev.or(n.blockdev) {
        let want = format!("{}:{}", mm[0], mm[1]);
        if o.rdev.as_deref() != Some(want.as_str()) {
            p.push(format!("rdev expected {want}, got {:?}", o.rdev));
        }
    }
    if let Some(m) = n.mode {
        let want = format!("{m:04o}");
        if o.mode.as_deref() != Some(want.as_str()) {
            p.push(format!("mode expected {want}, got {:?}", o.mode));
        }
    }
    if let Some(u) = n.uid {
        if o.uid != u {
            p.push(format!("uid expected {u}, got {}", o.uid));
        }
    }
    if let Some(g) = n.gid {
        if o.gid != g {
            p.push(format!("gid expected {g}, got {}", o.gid));
        }
    }
    if let Some(l) = n.nlink {
        if o.nlink != Some(l) {
            p.push(format!("nlink expected {l}, got {:?}", o.nlink));
        }
    }
    if let Some(want) = n.sparse {
        if o.sparse != Some(want) {
            p.push(format!("sparse expected {want}, got {:?}", o.sparse));
        }
    }
    if let Some(want) = n.d_ino_matches {
        if o.d_ino_matches != Some(want) {
            p.push(format!(
                "d_ino == st_ino expected {want}, got {:?}",
                o.d_ino_matches
            ));
        }
    }
    if let Some(t) = n.mtime {
        if o.mtime != Some(t) {
            p.push(format!(
                "mtime expected {t}, got {}",
                o.mtime
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "a recent time".into())
            ));
        }
    }
    let mut xattrs = n.xattrs.clone();
    if let Some(mark) = n.opaque {
        xattrs.insert("overlay.opaque".into(), Some(mark.value().into()));
    }
    if on_disk && n.whiteout == Some(crate::scenario::WhiteoutForm::Xattr) {
        xattrs
            .entry("overlay.whiteout".into())
            .or_insert(Some(String::new()));
    }
    for (name, want) in &xattrs {
        let real = crate::layers::xattr_name(name, prefix);
        let have = o.xattrs.get(&real);
        match (want.as_deref(), have) {
            (None, Some(v)) => p.push(format!("xattr {real} should be absent, is {v:?}")),
            (Some("<any>"), None) => p.push(format!("xattr {real} missing")),
            (Some("<any>"), Some(_)) | (None, None) => {}
            (Some(w), h) if h.map(|s| s.as_str()) != Some(w) => {
                p.push(format!("xattr {real} expected {w:?}, got {h:?}"))
            }
            _ => {}
        }
    }
    p
}

/// Result of comparing with the stored baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotStatus {
    Matched,
    /// No baseline for this kernel yet; a pending snapshot was written.
    New,
    /// A baseline exists and differs.
    Differs(String),
}

/// `<scenario>@<implementation>-<kernel>-<set>`: one baseline per kernel
/// major.minor and option set.
pub fn snapshot_name(scenario: &str, implementation: &str, kernel: &str, set: &str) -> String {
    format!("{scenario}@{implementation}-{kernel}-{set}")
}

pub fn snapshot_dir(sc: &Scenario) -> PathBuf {
    sc.file.parent().unwrap_or(Path::new(".")).join("snapshots")
}

/// Compare with insta. insta writes `.snap.new` for review (outside CI).
pub fn snapshot(sc: &Scenario, name: &str, obs: &Observation) -> SnapshotStatus {
    let dir = snapshot_dir(sc);
    let existed = dir.join(format!("{name}.snap")).exists();
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(&dir);
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings.set_description(sc.spec.description.trim());
    settings.set_input_file(&sc.file);
    let result = quiet_panics(|| settings.bind(|| insta::assert_yaml_snapshot!(name, obs)));
    match (result, existed) {
        (Ok(()), _) => SnapshotStatus::Matched,
        (Err(_), false) => SnapshotStatus::New,
        (Err(e), true) => SnapshotStatus::Differs(
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "snapshot differs".into()),
        ),
    }
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Catch insta's panic without printing a backtrace for it: insta has
/// already printed what differs.
fn quiet_panics(f: impl FnOnce()) -> std::thread::Result<()> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                default(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    r
}
