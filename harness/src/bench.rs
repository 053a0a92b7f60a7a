//! `ovlconf bench`: the suite's cost against the syscall floor.
//!
//! The floor is a bare loop of the syscalls one trial makes (two tmpfs
//! mounts, a few layer files, the overlay mount, a few steps, a walk with
//! lstat of the merged view, the unmounts) with no harness logic, run with
//! the same parallelism as the harness. The rest measures how the harness
//! scales with layer size and with the number of lower layers.

use std::fs;
use std::path::Path;
use std::time::Instant;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde::{Deserialize, Serialize};

/// Measured inside a sandbox child.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloorResult {
    pub iterations: usize,
    pub seconds: f64,
}

/// The floor loop. Per iteration: what a small trial does, syscalls only.
pub fn floor(iterations: usize, files: usize) -> Result<FloorResult, String> {
    let e = |what: &str, err: nix::Error| format!("{what}: {err}");
    let base = Path::new("/tmp/floor");
    let (lower, upper, merged) = (base.join("l"), base.join("u"), base.join("m"));
    for d in [&lower, &upper, &merged] {
        fs::create_dir_all(d).map_err(|x| x.to_string())?;
    }
    let start = Instant::now();
    for _ in 0..iterations {
        mount(
            Some("tmpfs"),
            &lower,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|x| e("tmpfs", x))?;
        mount(
            Some("tmpfs"),
            &upper,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|x| e("tmpfs", x))?;
        fs::create_dir(lower.join("d")).map_err(|x| x.to_string())?;
        for i in 0..files {
            fs::write(lower.join(format!("d/f{i}")), "data\n").map_err(|x| x.to_string())?;
        }
        fs::create_dir(upper.join("u")).map_err(|x| x.to_string())?;
        fs::create_dir(upper.join("w")).map_err(|x| x.to_string())?;
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.join("u").display(),
            upper.join("w").display()
        );
        crate::mount::mount_overlay_at(&merged, &opts).map_err(|x| e("overlay", x))?;
        // Steps: a stat, a write-open (copy-up), a write, an unlink.
        let _ = fs::symlink_metadata(merged.join("d/f0"));
        {
            use std::io::Write;
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(merged.join("d/f0"))
                .map_err(|x| x.to_string())?;
            f.write_all(b"more\n").map_err(|x| x.to_string())?;
        }
        let _ = fs::remove_file(merged.join("d/f1"));
        // Observe: walk the merged view with lstat, read small files.
        for entry in fs::read_dir(merged.join("d")).map_err(|x| x.to_string())? {
            let p = entry.map_err(|x| x.to_string())?.path();
            let _ = fs::symlink_metadata(&p);
            let _ = fs::read(&p);
        }
        umount2(&merged, MntFlags::empty()).map_err(|x| e("umount", x))?;
        umount2(&upper, MntFlags::empty()).map_err(|x| e("umount", x))?;
        umount2(&lower, MntFlags::empty()).map_err(|x| e("umount", x))?;
    }
    Ok(FloorResult {
        iterations,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Building and observing large or deep stacks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleResult {
    pub files: usize,
    pub layers: usize,
    pub build_s: f64,
    pub mount_s: f64,
    pub observe_s: f64,
    pub observed: usize,
}

/// `files` files spread over the layers (at least one each), built with
/// the harness's own layer builder, mounted (through fsopen/lowerdir+ when
/// there are more layers than mount(2)'s one page of options holds) and
/// observed with the harness's own observer.
pub fn scale(files: usize, layers: usize) -> Result<ScaleResult, String> {
    use crate::scenario::{LayersSpec, NodeSpec, TreeSpec};
    let per_layer = files.div_ceil(layers).max(1);
    let mut spec = LayersSpec::default();
    for l in 0..layers {
        let mut tree = TreeSpec::new();
        for i in 0..per_layer {
            let node = NodeSpec {
                file: Some(format!("{l}/{i}\n")),
                ..Default::default()
            };
            let span = serde_saphyr::Spanned::new(
                node,
                serde_saphyr::Location::UNKNOWN,
                serde_saphyr::Location::UNKNOWN,
            );
            tree.insert(format!("d{}/l{l}-f{i}", i % 100), span);
        }
        spec.lower.push(tree);
    }
    spec.upper = Some(TreeSpec::new());
    let set = crate::matrix::OptionSet {
        placement: crate::matrix::Placement::Samefs,
        ..Default::default()
    };
    let t = Instant::now();
    let stack = crate::layers::build(&spec, crate::scenario::FsKind::Tmpfs, &set)
        .map_err(|e| e.to_string())?;
    let build_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let opts = crate::mount::options(&stack, &set, &Default::default());
    let outcome = if opts.len() < 4000 {
        crate::mount::mount_overlay(&stack, &opts)
    } else {
        let mut params: Vec<String> = stack
            .lowers
            .iter()
            .map(|l| format!("lowerdir+={}", l.display()))
            .collect();
        params.push(format!(
            "upperdir={}",
            stack.upper.as_ref().expect("upper").display()
        ));
        params.push(format!(
            "workdir={}",
            stack.work.as_ref().expect("work").display()
        ));
        crate::mount::mount_fsopen(&stack, &params)
    };
    if outcome != crate::scenario::Outcome::Ok {
        return Err(format!("mounting {layers} layers: {outcome}"));
    }
    let mount_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut observer = crate::observe::Observer::new(&stack);
    let merged = observer.merged(&stack.merged).map_err(|e| e.to_string())?;
    Ok(ScaleResult {
        files,
        layers,
        build_s,
        mount_s,
        observe_s: t.elapsed().as_secs_f64(),
        observed: merged.len(),
    })
}
