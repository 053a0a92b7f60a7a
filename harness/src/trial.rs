//! One trial, end to end inside its sandbox child: build layers → mount →
//! run steps → observe. The parent compares and snapshots.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::implementation::{Implementations, Style};
use crate::layers;
use crate::matrix::Matrix;
use crate::mount;
use crate::observe::{Observation, Observer};
use crate::probe;
use crate::scenario::{self, Outcome, Vocabulary};
use crate::spec::SpecIds;
use crate::steps::Ctx;

/// What the parent sends a trial child.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialJob {
    pub cases_root: PathBuf,
    pub file: PathBuf,
    pub set: String,
    pub implementation: String,
    pub userns: bool,
    pub root: bool,
}

impl TrialJob {
    pub fn privilege(&self) -> crate::sandbox::Privilege {
        use crate::sandbox::Privilege;
        match (self.root, self.userns) {
            (true, false) => Privilege::Root,
            (true, true) => Privilege::UsernsMapped,
            (false, _) => Privilege::UsernsSelf,
        }
    }
}

/// A loaded trial, ready to run inside the sandbox.
pub struct PreparedTrial {
    scenario: scenario::Scenario,
    set: crate::matrix::OptionSet,
    backend: mount::Backend,
}

/// The mount backend of an implementation named in cases/implementations.yaml.
pub fn backend_for(
    cases_root: &std::path::Path,
    implementation: &str,
) -> Result<mount::Backend, String> {
    let impls = Implementations::load(cases_root).map_err(|e| e.to_string())?;
    let profile = impls
        .implementations
        .get(implementation)
        .ok_or_else(|| format!("unknown implementation {implementation}"))?;
    let workspace = cases_root.parent().unwrap_or(cases_root);
    let mut backend = mount::Backend {
        style: profile.style,
        argv: profile.argv(workspace),
        fsopen_params: None,
        pinned: None,
    };
    backend.pin()?;
    Ok(backend)
}

/// Runs in the child before it enters its namespaces: load what it needs.
pub fn prepare(job: TrialJob) -> Result<PreparedTrial, String> {
    let spec_ids = SpecIds::load(&job.cases_root.join("BEHAVIOURS.md"))
        .map_err(|e| format!("BEHAVIOURS.md: {e}"))?;
    let matrix = Matrix::load(&job.cases_root.join("matrix.yaml")).map_err(|e| e.to_string())?;
    let features = probe::feature_names();
    let vocab = Vocabulary {
        spec_ids: &spec_ids,
        matrix: &matrix,
        features: &features,
    };
    let sc = scenario::load(&job.file, &job.cases_root, &vocab).map_err(|e| e.to_string())?;
    let set = matrix
        .sets
        .get(&job.set)
        .ok_or_else(|| format!("unknown option set {}", job.set))?
        .clone();
    let backend = backend_for(&job.cases_root, &job.implementation)?;
    Ok(PreparedTrial {
        scenario: sc,
        set,
        backend,
    })
}

/// Runs in the child: the whole trial, returning what was observed.
pub fn observe_trial(t: PreparedTrial) -> Result<(Observation, Stages), String> {
    let (sc, set, backend) = (&t.scenario, &t.set, &t.backend);
    let mut clock = Stopwatch::default();

    let stack = layers::build(&sc.spec.layers, sc.spec.fs, set)
        .map_err(|e| format!("building layers: {e}"))?;
    clock.lap("build layers");
    let opts = mount::options(&stack, set, &sc.spec.mount);
    let mut backend = backend.clone();
    if sc.spec.mount.api == crate::scenario::MountApi::Fsopen {
        let mut params = match &sc.spec.mount.params {
            Some(p) => p.clone(),
            None => mount::params_of(&opts),
        };
        if sc.spec.mount.params.is_some() {
            params.extend(set.options.iter().cloned());
        }
        backend.fsopen_params = Some(params);
    }
    let backend = &backend;
    let mut obs = Observation {
        module_params: if backend.style == Style::Kernel {
            mount::module_params()
        } else {
            Default::default()
        },
        ..Default::default()
    };
    let mounted = backend.mount(&stack, &opts);
    obs.mount = mounted.to_string();
    obs.mount_log = mount::take_mount_log();
    clock.lap("mount");
    if mounted != Outcome::Ok {
        // A refused mount: the layers as left behind are still worth seeing.
        let mut observer = Observer::new(&stack);
        if let Some(u) = &stack.upper {
            obs.upper = observer
                .layer(u)
                .map_err(|e| format!("observing upper: {e}"))?;
        }
        clock.lap("observe");
        return Ok((obs, clock.stages));
    }
    obs.mount_options = mount::mountinfo_options(&stack.merged).unwrap_or_default();

    let mut ctx = Ctx {
        stack: &stack,
        backend,
        mount_opts: opts,
        fds: Default::default(),
        observer: Observer::new(&stack),
        captures: BTreeMap::new(),
        fsid_captures: BTreeMap::new(),
        handles: BTreeMap::new(),
        maps: BTreeMap::new(),
        programs: BTreeMap::new(),
    };
    let xino_shown = if backend.style == Style::Kernel {
        &obs.mount_options
    } else {
        &set.options
    };
    ctx.observer
        .note_xino(xino_shown.iter().any(|o| o == "xino=on"));
    ctx.note_mounted();
    for step in &sc.steps {
        obs.steps.push(ctx.run(step));
    }
    ctx.fds.clear();
    ctx.maps.clear();
    ctx.programs.clear();
    clock.lap("run steps");
    // A step may have left the overlay unmounted (a failed mount cycle).
    let still_mounted = mount::mountinfo_options(&stack.merged).is_some();
    if still_mounted && mount::daemon_status().is_none() {
        ctx.note_mounted();
        obs.merged = ctx
            .observer
            .merged(&stack.merged)
            .map_err(|e| format!("observing merged view: {e}"))?;
    }
    if let Some(u) = &stack.upper {
        obs.upper = ctx
            .observer
            .layer(u)
            .map_err(|e| format!("observing upper: {e}"))?;
    }
    if let Some(w) = &stack.work {
        obs.work = ctx
            .observer
            .work(w)
            .map_err(|e| format!("observing work: {e}"))?;
    }
    obs.identities = ctx.captures.clone();
    for (k, v) in &ctx.fsid_captures {
        obs.identities.insert(format!("fsid:{k}"), v.clone());
    }
    clock.lap("observe");
    Ok((obs, clock.stages))
}

/// Microseconds spent per pipeline stage.
pub type Stages = BTreeMap<String, u64>;

/// Adds the time since the last lap to a named stage.
pub struct Stopwatch {
    last: std::time::Instant,
    pub stages: Stages,
}

impl Default for Stopwatch {
    fn default() -> Self {
        Stopwatch {
            last: std::time::Instant::now(),
            stages: Stages::new(),
        }
    }
}

impl Stopwatch {
    pub fn lap(&mut self, stage: &str) {
        let now = std::time::Instant::now();
        *self.stages.entry(stage.to_string()).or_default() += (now - self.last).as_micros() as u64;
        self.last = now;
    }
}
