//! The libtest-mimic harness: scenarios × option sets → trials.
//!
//! Trial names are `<implementation>/<kernel>/<option-set>/<area>/<scenario>`
//! so `cargo test metacopy` or `cargo nextest run -E 'test(/copy-up/)'`
//! filter naturally. A scenario that fails to load becomes a failing trial
//! `parse/<area>/<file>` naming file:line:column; the others still run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use serde::{Deserialize, Serialize};

use crate::compare::{self, SnapshotStatus, TrialContext};
use crate::implementation::{Implementations, Profile};
use crate::matrix::{Matrix, OptionSet};
use crate::observe::Observation;
use crate::probe::{self, Features};
use crate::report::{self, Results, Status, TrialResult};
use crate::sandbox::{self, Privilege};
use crate::scenario::{self, FsKind, Op, Scenario, Vocabulary};
use crate::spec::SpecIds;
use crate::trial::{self, TrialJob};

/// Per-trial timeout unless the scenario sets one: `$OVLCONF_TIMEOUT`
/// seconds, else 60.
fn default_timeout() -> Duration {
    let secs = std::env::var("OVLCONF_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// A job for a sandbox child.
#[derive(Debug, Serialize, Deserialize)]
pub enum ChildJob {
    Trial(TrialJob),
    Probe {
        root: bool,
        implementations: Vec<probe::ImplementationProbe>,
    },
    /// `ovlconf bench`: the syscall floor loop.
    Floor {
        iterations: usize,
        files: usize,
    },
    /// `ovlconf bench`: a large or deep stack.
    Scale {
        files: usize,
        layers: usize,
    },
}

enum Prepared {
    Bench(ChildJob),
    Trial(Box<trial::PreparedTrial>),
    Probe(bool, Vec<probe::ImplementationProbe>),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ChildResult {
    Observed(Box<Observation>, trial::Stages),
    Probed(Features),
    Floor(crate::bench::FloorResult),
    Scale(crate::bench::ScaleResult),
}

/// Call first thing in `main` of every binary that runs trials: in a
/// sandbox child this runs the job and exits.
pub fn dispatch_child() {
    if let Ok(payload) = std::env::var(sandbox::CHILD_ENV) {
        sandbox::child_main(
            &payload,
            |job: ChildJob| match job {
                ChildJob::Trial(t) => {
                    Ok((t.privilege(), Prepared::Trial(Box::new(trial::prepare(t)?))))
                }
                job @ (ChildJob::Floor { .. } | ChildJob::Scale { .. }) => {
                    Ok((Privilege::Root, Prepared::Bench(job)))
                }
                ChildJob::Probe {
                    root,
                    mut implementations,
                } => {
                    for imp in &mut implementations {
                        let mut b = crate::mount::Backend {
                            style: imp.style,
                            argv: imp.argv.clone(),
                            fsopen_params: None,
                            pinned: None,
                        };
                        // A daemon that cannot be opened shows up as refusing every set.
                        if b.pin().is_ok() {
                            imp.pinned = b.pinned;
                        }
                    }
                    let privilege = if root {
                        Privilege::Root
                    } else {
                        Privilege::UsernsSelf
                    };
                    Ok((privilege, Prepared::Probe(root, implementations)))
                }
            },
            |prepared| match prepared {
                Prepared::Bench(ChildJob::Floor { iterations, files }) => {
                    crate::bench::floor(iterations, files).map(ChildResult::Floor)
                }
                Prepared::Bench(ChildJob::Scale { files, layers }) => {
                    crate::bench::scale(files, layers).map(ChildResult::Scale)
                }
                Prepared::Bench(_) => Err("not a bench job".into()),
                Prepared::Trial(t) => {
                    trial::observe_trial(*t).map(|(o, st)| ChildResult::Observed(Box::new(o), st))
                }
                Prepared::Probe(root, implementations) => {
                    let mut f = probe::probe_all(root);
                    if root {
                        f.implementation_sets = probe::probe_implementations(&implementations);
                    }
                    Ok(ChildResult::Probed(f))
                }
            },
        );
    }
}

/// The workspace root: `$OVLCONF_ROOT`, else where this crate was built.
pub fn workspace_root() -> PathBuf {
    if let Some(p) = std::env::var_os("OVLCONF_ROOT") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// `6.18` from `6.18.44-...`: baselines are per major.minor.
pub fn kernel_label(release: &str) -> String {
    release.split('.').take(2).collect::<Vec<_>>().join(".")
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Probe the running kernel once per process, in a sandbox child.
pub fn features(implementations: &[probe::ImplementationProbe]) -> &'static Features {
    static F: OnceLock<Features> = OnceLock::new();
    F.get_or_init(|| {
        let root = sandbox::is_root();
        let job = ChildJob::Probe {
            root,
            implementations: implementations.to_vec(),
        };
        // Probes mount and mkfs; under nextest every trial is its own
        // process, so results are kept per boot, kernel, user and job.
        // The binary's identity too: a rebuilt harness may probe differently.
        let exe = std::env::current_exe()
            .and_then(|p| p.metadata())
            .and_then(|m| m.modified())
            .map(|t| format!("{t:?}"))
            .unwrap_or_default();
        let key = format!(
            "{}|{}|{}|{}|{}|{exe}",
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .unwrap_or_default()
                .trim(),
            kernel_release(),
            nix::unistd::geteuid(),
            probe::feature_names().join(","),
            serde_json::to_string(&job).unwrap_or_default()
        );
        let cache = workspace_root().join("target/ovlconf/probe-cache.json");
        if let Some(f) = std::fs::read(&cache)
            .ok()
            .and_then(|b| serde_json::from_slice::<(String, Features)>(&b).ok())
            .and_then(|(k, f)| (k == key).then_some(f))
        {
            return f;
        }
        match sandbox::run_child::<_, ChildResult>(&job, Duration::from_secs(120)) {
            Ok(ChildResult::Probed(f)) => {
                let tmp = cache.with_extension(format!("{}.tmp", std::process::id()));
                let written = cache
                    .parent()
                    .map(std::fs::create_dir_all)
                    .transpose()
                    .is_ok()
                    && std::fs::write(&tmp, serde_json::to_vec(&(&key, &f)).unwrap_or_default())
                        .is_ok();
                if written {
                    let _ = std::fs::rename(&tmp, &cache);
                }
                f
            }
            Ok(_) => panic!("probe child answered with something else"),
            Err(e) => {
                // No probe, no features: everything that requires one skips.
                let mut f = Features::default();
                for (name, _) in probe::FEATURES {
                    f.missing
                        .insert(name.to_string(), format!("probe failed: {e}"));
                }
                f
            }
        }
    })
}

/// All `*.yaml` scenario files below `cases/`, sorted (matrix.yaml excluded).
pub fn discover(cases: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![cases.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "snapshots")
                    && p != cases.join(crate::implementation::DEVIATIONS_DIR)
                {
                    dirs.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "yaml") && p.parent() != Some(cases) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Why this scenario cannot run under this set here, before trying it.
pub fn static_skip(sc: &Scenario, set: &OptionSet, root: bool) -> Option<String> {
    if !root && !set.userns {
        return Some(
            "needs real root: this option set mounts in the initial user namespace".into(),
        );
    }
    if !set.userns {
        return None;
    }
    if sc.spec.fs != FsKind::Tmpfs {
        return Some(format!(
            "{} cannot be mounted inside a user namespace",
            sc.spec.fs.name()
        ));
    }
    let trees = sc
        .spec
        .layers
        .trees()
        .chain(sc.steps.iter().filter_map(|s| match &s.op {
            Op::Offline(a) => Some(&a.add),
            _ => None,
        }));
    for tree in trees {
        for (path, n) in tree {
            let n = &n.value;
            if n.chardev.is_some() || n.blockdev.is_some() {
                return Some(format!(
                    "`{path}`: device nodes cannot be made inside a user namespace"
                ));
            }
            if n.xattrs
                .keys()
                .any(|k| k.starts_with("trusted.") || k.starts_with("security."))
            {
                return Some(format!(
                    "`{path}`: trusted.*/security.* xattrs need real root"
                ));
            }
            if !root && (n.uid.unwrap_or(0) != 0 || n.gid.unwrap_or(0) != 0) {
                return Some(format!(
                    "`{path}`: only uid/gid 0 is mapped when not running as root"
                ));
            }
        }
    }
    for s in &sc.steps {
        match &s.op {
            Op::DropCaches => return Some("drop_caches needs real root".into()),
            Op::Setxattr(a) if a.name.starts_with("trusted.") => {
                return Some("trusted.* xattrs need real root".into())
            }
            Op::Mknod(a)
                if matches!(
                    a.kind,
                    scenario::MknodKind::Chardev | scenario::MknodKind::Blockdev
                ) =>
            {
                return Some("device nodes cannot be made inside a user namespace".into())
            }
            _ => {}
        }
        if !root && s.as_user.is_some() {
            return Some("steps as another user need uids mapped, which needs root".into());
        }
    }
    None
}

/// Features a trial needs beyond the scenario's own `requires:`.
fn implied_requirements(sc: &Scenario, set: &OptionSet) -> Vec<String> {
    let mut r: Vec<String> = sc.spec.requires.iter().map(|s| s.value.clone()).collect();
    match sc.spec.fs {
        FsKind::Tmpfs => {}
        other => r.push(format!("fs_{}", other.name())),
    }
    if set.userns {
        r.push("userns_overlay".into());
    }
    if sc.spec.fs == FsKind::Tmpfs && (set.userns || uses_user_xattrs(sc)) {
        // Overlay keeps its own xattrs in user.* under userxattr, and tmpfs
        // has user.* xattrs only on newer kernels.
        r.push("tmpfs_user_xattr".into());
    }
    r
}

/// Whether a scenario puts or sets user.* xattrs on its layers.
fn uses_user_xattrs(sc: &Scenario) -> bool {
    let trees = sc.spec.layers.trees();
    let in_layers = trees
        .flat_map(|t| t.values())
        .any(|n| n.value.xattrs.keys().any(|k| k.starts_with("user.")));
    let in_steps = sc.steps.iter().any(|s| match &s.op {
        Op::Setxattr(a) => a.name.starts_with("user."),
        Op::Offline(a) => a
            .add
            .values()
            .any(|n| n.value.xattrs.keys().any(|k| k.starts_with("user."))),
        _ => false,
    });
    in_layers || in_steps
}

/// Everything a run needs to build its trials.
pub struct Suite {
    pub root: PathBuf,
    pub cases: PathBuf,
    pub matrix: Matrix,
    pub kernel: String,
    pub release: String,
    pub scenarios: Vec<Scenario>,
    pub load_errors: Vec<scenario::LoadError>,
    /// Microseconds spent parsing and checking every scenario.
    pub parse_us: u64,
    pub implementations: Implementations,
    /// FUSE implementations whose daemon is installed, and what to probe.
    pub probes: Vec<probe::ImplementationProbe>,
    /// Implementation -> why it cannot run here (daemon not installed).
    pub unavailable: BTreeMap<String, String>,
}

impl Suite {
    pub fn load(root: &Path) -> Result<Suite, String> {
        let cases = root.join("cases");
        let spec_ids = SpecIds::load(&cases.join("BEHAVIOURS.md"))
            .map_err(|e| format!("{}: {e}", cases.join("BEHAVIOURS.md").display()))?;
        let matrix = Matrix::load(&cases.join("matrix.yaml")).map_err(|e| e.to_string())?;
        let features = probe::feature_names();
        let vocab = Vocabulary {
            spec_ids: &spec_ids,
            matrix: &matrix,
            features: &features,
        };
        let mut scenarios = Vec::new();
        let mut load_errors = Vec::new();
        let parse_started = Instant::now();
        for f in discover(&cases) {
            match scenario::load(&f, &cases, &vocab) {
                Ok(s) => scenarios.push(s),
                Err(e) => load_errors.push(e),
            }
        }
        let release = kernel_release();
        let mut implementations = Implementations::load(&cases).map_err(|e| e.to_string())?;
        if let Ok(only) = std::env::var("OVLCONF_IMPLEMENTATIONS") {
            // Narrow the matrix, e.g. to the kernel while writing scenarios.
            let wanted: Vec<&str> = only.split(',').map(str::trim).collect();
            if let Some(bad) = wanted
                .iter()
                .find(|w| !implementations.implementations.contains_key(**w))
            {
                return Err(format!(
                    "OVLCONF_IMPLEMENTATIONS names `{bad}`, which cases/implementations.yaml does not define"
                ));
            }
            implementations
                .implementations
                .retain(|name, _| wanted.contains(&name.as_str()));
        }
        let mut probes = Vec::new();
        let mut unavailable = BTreeMap::new();
        for (name, profile) in &implementations.implementations {
            if profile.is_kernel() {
                continue;
            }
            let argv = profile.argv(root);
            match daemon_version(&argv) {
                Ok(_) => probes.push(probe::ImplementationProbe {
                    name: name.clone(),
                    style: profile.style,
                    argv,
                    pinned: None,
                    sets: matrix
                        .sets
                        .iter()
                        .filter(|(_, s)| !s.userns)
                        .map(|(n, s)| (n.clone(), s.options.clone()))
                        .collect(),
                }),
                Err(why) => {
                    unavailable.insert(name.clone(), why);
                }
            }
        }
        let parse_us = parse_started.elapsed().as_micros() as u64;
        Ok(Suite {
            parse_us,
            implementations,
            probes,
            unavailable,
            root: root.to_path_buf(),
            cases,
            kernel: kernel_label(&release),
            release,
            matrix,
            scenarios,
            load_errors,
        })
    }

    /// The option sets a scenario runs under.
    pub fn sets_for<'a>(
        &'a self,
        sc: &'a Scenario,
    ) -> impl Iterator<Item = (&'a String, &'a OptionSet)> + 'a {
        self.matrix.sets.iter().filter(move |(name, _)| {
            let allowed = match &sc.spec.option_sets {
                Some(list) => list.iter().any(|s| &s.value == *name),
                None => true,
            };
            allowed && !sc.spec.skip_option_sets.iter().any(|s| &s.value == *name)
        })
    }

    /// `profile/<implementation>`: the option sets a profile claims must be
    /// exactly those its daemon accepted when probed.
    fn profile_trial(&self, name: &str, profile: &Profile) -> Trial {
        let name = name.to_string();
        let claimed: BTreeSet<String> = profile.option_sets.iter().cloned().collect();
        let unavailable = self.unavailable.get(&name).cloned();
        let probes = self.probes.clone();
        Trial::ignorable_test(format!("profile/{name}"), move || {
            if let Some(why) = unavailable {
                return Ok(Completion::ignored_with(why));
            }
            let probed = features(&probes)
                .implementation_sets
                .get(&name)
                .cloned()
                .unwrap_or_default();
            let accepted: BTreeSet<String> = probed
                .iter()
                .filter(|(_, r)| r.is_none())
                .map(|(s, _)| s.clone())
                .collect();
            if accepted == claimed {
                return Ok(Completion::Completed);
            }
            let refused: Vec<String> = probed
                .iter()
                .filter_map(|(s, r)| r.as_ref().map(|r| format!("{s}: {r}")))
                .collect();
            Err(format!(
                "cases/implementations.yaml claims option sets {claimed:?} for {name}, but its daemon accepted {accepted:?}; refused:\n  {}",
                refused.join("\n  ")
            )
            .into())
        })
    }

    pub fn trials(&self, results: Arc<Mutex<Vec<TrialResult>>>) -> Vec<Trial> {
        let mut trials = Vec::new();
        for e in &self.load_errors {
            let rel = e
                .file
                .strip_prefix(&self.cases)
                .unwrap_or(&e.file)
                .display()
                .to_string();
            let name = format!("parse/{}", rel.trim_end_matches(".yaml"));
            let pretty = format!(
                "{}:{}:{}: {}",
                rel_to(&e.file, &self.root),
                e.line,
                e.column,
                e.message
            );
            let results = results.clone();
            trials.push(Trial::test(name.clone(), move || {
                results.lock().expect("results").push(TrialResult {
                    name,
                    status: Status::Fail,
                    reason: pretty.clone(),
                    covers: vec![],
                    duration_ms: 0,
                    steps: 0,
                    stages_us: Default::default(),
                });
                Err(Failed::from(pretty))
            }));
        }
        let root = sandbox::is_root();
        for (impl_name, profile) in &self.implementations.implementations {
            if !profile.is_kernel() {
                trials.push(self.profile_trial(impl_name, profile));
            }
            for sc in &self.scenarios {
                for (set_name, set) in self.sets_for(sc) {
                    let name = format!(
                        "{impl_name}/{}/{set_name}/{}/{}",
                        self.kernel, sc.area, sc.name
                    );
                    let plan = TrialPlan {
                        sc: sc.clone(),
                        set: set.clone(),
                        set_name: set_name.clone(),
                        implementation: impl_name.clone(),
                        profile: profile.clone(),
                        unavailable: self.unavailable.get(impl_name).cloned(),
                        probes: self.probes.clone(),
                        kernel: self.kernel.clone(),
                        cases: self.cases.clone(),
                        root,
                    };
                    let results = results.clone();
                    trials.push(Trial::ignorable_test(name.clone(), move || {
                        let start = Instant::now();
                        let (outcome, status, reason, stages) = plan.run();
                        results.lock().expect("results").push(TrialResult {
                            name,
                            status,
                            reason,
                            covers: plan
                                .sc
                                .spec
                                .covers
                                .iter()
                                .map(|c| c.value.clone())
                                .collect(),
                            duration_ms: start.elapsed().as_millis() as u64,
                            steps: plan.sc.steps.len(),
                            stages_us: stages,
                        });
                        outcome
                    }));
                }
            }
        }
        trials
    }
}

fn rel_to(p: &Path, root: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

/// Strict mode: a trial without a baseline fails instead of passing.
pub fn strict() -> bool {
    std::env::var("OVLCONF_STRICT").is_ok_and(|v| v == "1")
}

/// Everything one trial needs, owned, so it can run on any thread.
struct TrialPlan {
    sc: Scenario,
    set: OptionSet,
    set_name: String,
    implementation: String,
    profile: Profile,
    unavailable: Option<String>,
    probes: Vec<probe::ImplementationProbe>,
    kernel: String,
    cases: PathBuf,
    root: bool,
}

type TrialOutcome = (Result<Completion, Failed>, Status, String, trial::Stages);

impl TrialPlan {
    fn skip(why: String) -> TrialOutcome {
        (
            Ok(Completion::ignored_with(why.clone())),
            Status::Skip,
            why,
            Default::default(),
        )
    }

    fn fail(why: String) -> TrialOutcome {
        (
            Err(why.clone().into()),
            Status::Fail,
            why,
            Default::default(),
        )
    }

    /// `<set>/<area>/<scenario>`: what deviation patterns match against.
    fn key(&self) -> String {
        format!("{}/{}/{}", self.set_name, self.sc.area, self.sc.name)
    }

    fn run(&self) -> TrialOutcome {
        let (sc, set) = (&self.sc, &self.set);
        if let Some(why) = &self.unavailable {
            return Self::skip(why.clone());
        }
        if let Some(why) = static_skip(sc, set, self.root) {
            return Self::skip(why);
        }
        let features = features(&self.probes);
        if !self.profile.is_kernel() {
            if set.userns {
                return Self::skip(
                    "FUSE daemons run only as root in the initial user namespace here".into(),
                );
            }
            if sc.spec.mount.api == crate::scenario::MountApi::Fsopen {
                return Self::skip("the scenario mounts through the kernel's new mount API".into());
            }
            if sc.spec.layers.nested.is_some() || sc.uses_extra_mount() {
                return Self::skip(
                    "the scenario stacks a second kernel overlay mount (nested or extra_mount)"
                        .into(),
                );
            }
            match features
                .implementation_sets
                .get(&self.implementation)
                .and_then(|m| m.get(&self.set_name))
            {
                Some(None) => {}
                Some(Some(why)) => {
                    return Self::skip(format!(
                        "{} cannot express option set {}: {why}",
                        self.implementation, self.set_name
                    ))
                }
                None => {
                    return Self::skip(format!(
                        "{} was not probed (needs root)",
                        self.implementation
                    ))
                }
            }
        }
        if let Some(why) = features.unmet(&implied_requirements(sc, set)) {
            return Self::skip(why);
        }
        let job = ChildJob::Trial(TrialJob {
            cases_root: self.cases.clone(),
            file: sc.file.clone(),
            set: self.set_name.clone(),
            implementation: self.implementation.clone(),
            userns: set.userns,
            root: self.root,
        });
        let timeout = sc
            .spec
            .timeout
            .map(Duration::from_secs)
            .unwrap_or_else(default_timeout);
        let started = Instant::now();
        let watch = crate::kmsg::Watch::start(&format!(
            "{}/{}/{}",
            self.implementation,
            self.kernel,
            self.key()
        ));
        let child = sandbox::run_child::<_, ChildResult>(&job, timeout);
        if let Some(kernel_trouble) = watch.finish() {
            return Self::fail(match child {
                Err(e) => format!("{e}\n{kernel_trouble}"),
                Ok(_) => kernel_trouble,
            });
        }
        let (obs, mut stages) = match child {
            Ok(ChildResult::Observed(o, st)) => (*o, st),
            Ok(_) => return Self::fail("trial child answered with something else".into()),
            Err(e) => {
                // A daemon may fail so early that nothing is observed
                // (e.g. EIO on its root); that too can be a known deviation.
                return match self.profile.deviation(&self.key(), &e) {
                    Some(d) if !self.profile.is_kernel() => {
                        let why = format!("deviates (expected): {} — trial error: {e}", d.reason);
                        (
                            Ok(Completion::ignored_with(why.clone())),
                            Status::Deviates,
                            why,
                            BTreeMap::new(),
                        )
                    }
                    _ => Self::fail(e),
                };
            }
        };
        let ctx = TrialContext {
            set_name: &self.set_name,
            implementation: &self.implementation,
            features,
            xattr_prefix: set.xattr_prefix(),
            check_upper: self.profile.is_kernel(),
        };
        // What the child did not account for: process start, namespaces,
        // and the kernel tearing them down.
        let inside: u64 = stages.values().sum();
        stages.insert(
            "sandbox and clean-up".into(),
            (started.elapsed().as_micros() as u64).saturating_sub(inside),
        );
        let mut clock = trial::Stopwatch::default();
        let problems = compare::check(sc, &obs, &ctx);
        let name =
            compare::snapshot_name(&sc.name, &self.implementation, &self.kernel, &self.set_name);
        let mut note = String::new();
        match compare::snapshot(sc, &name, &obs) {
            SnapshotStatus::Matched => {}
            SnapshotStatus::New if strict() => {
                return Self::fail(format!("no baseline snapshot {name} (strict mode)"))
            }
            SnapshotStatus::New => note = format!("new snapshot {name} pending review"),
            // A FUSE daemon's observation varies between runs (attribute
            // caching, work-dir cleanup in the background): its snapshot is
            // a record, its verdict the expectations and deviations.
            SnapshotStatus::Differs(_) if !self.profile.is_kernel() => {
                note = format!("observation differs from the baseline snapshot {name} (a record only for FUSE daemons)")
            }
            SnapshotStatus::Differs(d) => {
                return Self::fail(format!(
                    "observation differs from the baseline snapshot {name}:\n{d}"
                ))
            }
        }
        clock.lap("compare and snapshot");
        stages.extend(clock.stages);
        let key = self.key();
        match problems.first() {
            None => match self.profile.declared_for(&key) {
                Some(d) => Self::fail(format!(
                    "expected deviation no longer occurs (remove it from cases/deviations/): {} — {}",
                    d.trial, d.reason
                )),
                None => (Ok(Completion::Completed), Status::Pass, note, stages),
            },
            Some(first) => match self.profile.deviation(&key, first) {
                Some(d) => {
                    let why = format!("deviates (expected): {} — first difference: {first}", d.reason);
                    (Ok(Completion::ignored_with(why.clone())), Status::Deviates, why, stages)
                }
                None => {
                    let file = sc.file.display();
                    Self::fail(format!("{file}: {} expectation(s) not met:\n  - {}", problems.len(), problems.join("\n  - ")))
                }
            },
        }
    }
}

/// `prog --version`'s first line, or why the daemon is not usable.
fn daemon_version(argv: &[String]) -> Result<String, String> {
    let prog = argv.first().ok_or("no command")?;
    let out = std::process::Command::new(prog)
        .arg("--version")
        .output()
        .map_err(|e| format!("{prog} is not installed ({e}); run ci/setup"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text
        .lines()
        .find(|l| l.contains("version"))
        .unwrap_or("")
        .trim()
        .to_string())
}

/// Whether libtest-mimic will run this trial (its filter and `--skip`).
fn selected(args: &Arguments, name: &str) -> bool {
    let matches = |pattern: &str| match args.exact {
        true => name == pattern,
        false => name.contains(pattern),
    };
    args.filter.as_deref().is_none_or(matches) && !args.skip.iter().any(|s| matches(s))
}

/// A line on stderr every 30 s of a long run: done, failed, time left.
struct Progress {
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(results: Arc<Mutex<Vec<TrialResult>>>, total: usize) -> Progress {
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let signal = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let (lock, cvar) = &*signal;
            let mut stopped = lock.lock().expect("progress");
            loop {
                let (guard, _) = cvar
                    .wait_timeout(stopped, Duration::from_secs(30))
                    .expect("progress");
                stopped = guard;
                if *stopped {
                    return;
                }
                let (done, failed) = {
                    let r = results.lock().expect("results");
                    let failed = r.iter().filter(|t| t.status == Status::Fail).count();
                    (r.len(), failed)
                };
                let elapsed = started.elapsed().as_secs();
                let left = (done > 0 && total > done)
                    .then(|| elapsed * (total - done) as u64 / done as u64)
                    .map(|s| format!(", about {}m{:02}s left", s / 60, s % 60))
                    .unwrap_or_default();
                eprintln!(
                    "ovlconf: {done}/{total} trials done ({}%), {failed} failed, {}m{:02}s{left}",
                    done * 100 / total.max(1),
                    elapsed / 60,
                    elapsed % 60
                );
            }
        });
        Progress {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        *self.stop.0.lock().expect("progress") = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Passed, failed, deviating and skipped trials per implementation.
pub fn summary_table(results: &[TrialResult]) -> String {
    let mut rows: BTreeMap<&str, [usize; 4]> = BTreeMap::new();
    for r in results {
        let who = r.name.split('/').next().unwrap_or("");
        let row = rows.entry(who).or_default();
        let col = match r.status {
            Status::Pass => 0,
            Status::Fail => 1,
            Status::Deviates => 2,
            Status::Skip => 3,
        };
        row[col] += 1;
    }
    let mut out = format!(
        "\n{:<22} {:>8} {:>8} {:>9} {:>8}\n",
        "implementation", "passed", "failed", "deviates", "skipped"
    );
    for (who, [p, f, d, k]) in rows {
        out.push_str(&format!("{who:<22} {p:>8} {f:>8} {d:>9} {k:>8}\n"));
    }
    out
}

/// The whole run: used by `tests/conformance.rs` and `ovlconf run`.
pub fn main_with(mut args: Arguments) -> std::process::ExitCode {
    dispatch_child();
    let root = workspace_root();
    let suite = match Suite::load(&root) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ovlconf: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if args.test_threads.is_none() {
        // Trials mostly wait on the kernel; a few more than cores keeps it busy.
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        args.test_threads = Some(cores * 2);
    }
    let results = Arc::new(Mutex::new(Vec::new()));
    let trials = suite.trials(results.clone());
    let taint_before = crate::kmsg::taint();
    let listing = args.list;
    let selected = trials.iter().filter(|t| selected(&args, t.name())).count();
    let progress = (!listing).then(|| Progress::start(results.clone(), selected));
    let conclusion = libtest_mimic::run(&args, trials);
    if listing {
        return conclusion.exit_code();
    }
    drop(progress);
    let results = std::mem::take(&mut *results.lock().expect("results"));
    if results.len() > 1 {
        eprintln!("{}", summary_table(&results));
    }
    let pending: Vec<String> = results
        .iter()
        .filter(|r| r.reason.starts_with("new snapshot"))
        .map(|r| r.name.clone())
        .collect();
    let mut results = Results::new(&suite.kernel, &suite.release, results);
    results.parse_us = suite.parse_us;
    let path = report::results_path(&root);
    let junit = path.with_extension("xml");
    match results
        .write(&path)
        .and_then(|()| report::write_junit(&results, &junit))
    {
        Err(e) => eprintln!("ovlconf: writing {}: {e}", path.display()),
        Ok(()) if !results.trials.is_empty() => {
            eprintln!(
                "ovlconf: results in {} and {}",
                path.display(),
                junit.display()
            )
        }
        Ok(()) => {}
    }
    if !pending.is_empty() {
        eprintln!(
            "ovlconf: {} trial(s) had no baseline for kernel {}; new snapshots are pending review (`cargo insta review`):",
            pending.len(),
            suite.kernel
        );
        for p in pending.iter().take(20) {
            eprintln!("  {p}");
        }
    }
    let taint_after = crate::kmsg::taint();
    if let (Some(b), Some(a)) = (taint_before, taint_after) {
        if a & !b != 0 {
            eprintln!("ovlconf: the kernel became tainted during this run: {b} -> {a} (new bits {:#x}); see dmesg", a & !b);
            return std::process::ExitCode::FAILURE;
        }
    }
    conclusion.exit_code()
}
