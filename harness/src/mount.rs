//! Stage 3, mount: the overlay option string, mount(2) and umount, and what
//! the kernel reports back in mountinfo and the module parameters.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::errno;
use crate::implementation::Style;
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

/// `$LOWER0`, `$UPPER`, `$WORK`, `$DATA0`, `$NESTED`, `$MERGED`, `$ROOT` -> paths.
pub fn expand(s: &str, stack: &Stack) -> String {
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
    if let Some(n) = &stack.nested {
        out = out.replace("$NESTED", &n.display().to_string());
    }
    out = out.replace("$MERGED", &stack.merged.display().to_string());
    out.replace("$ROOT", &stack.root.display().to_string())
}

/// How to mount: the kernel, or a FUSE daemon's argv and layer style.
#[derive(Debug, Clone)]
pub struct Backend {
    pub style: Style,
    pub argv: Vec<String>,
    /// Kernel only: mount through fsopen with these fsconfig calls.
    pub fsopen_params: Option<Vec<String>>,
    /// The daemon's program as `/proc/self/fd/N`, opened before the sandbox
    /// covers /tmp (where the workspace, and so target/tools, may live).
    pub pinned: Option<String>,
}

impl Backend {
    /// Open the daemon's program now, while the host's files are in view.
    pub fn pin(&mut self) -> Result<(), String> {
        self.pinned = match self.argv.first() {
            Some(prog) if self.style != Style::Kernel => Some(pin_program(prog)?),
            _ => None,
        };
        Ok(())
    }

    pub fn kernel() -> Backend {
        Backend {
            style: Style::Kernel,
            argv: vec![],
            fsopen_params: None,
            pinned: None,
        }
    }

    pub fn mount(&self, stack: &Stack, opts: &str) -> Outcome {
        match self.style {
            Style::Kernel => match &self.fsopen_params {
                Some(params) => mount_fsopen(stack, params),
                None => mount_overlay(stack, opts),
            },
            Style::Overlay => {
                let mut args = vec!["-o".to_string(), opts.to_string()];
                args.push(stack.merged.display().to_string());
                start_daemon(&self.argv, self.pinned.as_deref(), &args, &stack.merged)
            }
            Style::Unionfs => {
                let mut branches: Vec<String> = Vec::new();
                if let Some(u) = &stack.upper {
                    branches.push(format!("{}=RW", u.display()));
                }
                branches.extend(stack.lowers.iter().map(|l| format!("{}=RO", l.display())));
                let mut args = Vec::new();
                // The option set's options go through as they are, so the
                // daemon itself says whether it can express them.
                let extra: Vec<&str> = opts
                    .split(',')
                    .filter(|o| {
                        !o.starts_with("lowerdir=")
                            && !o.starts_with("upperdir=")
                            && !o.starts_with("workdir=")
                    })
                    .collect();
                if !extra.is_empty() && !extra.iter().all(|o| o.is_empty()) {
                    args.push("-o".to_string());
                    args.push(extra.join(","));
                }
                args.push(branches.join(":"));
                args.push(stack.merged.display().to_string());
                start_daemon(&self.argv, self.pinned.as_deref(), &args, &stack.merged)
            }
        }
    }

    pub fn unmount(&self, target: &Path) -> nix::Result<()> {
        unmount(target)?;
        if self.style != Style::Kernel {
            stop_daemon();
        }
        Ok(())
    }
}

/// The FUSE daemon serving the trial's mount (one at a time).
static DAEMON: Mutex<Option<Child>> = Mutex::new(None);

const DAEMON_LOG: &str = "/tmp/daemon.log";

/// Start a FUSE daemon in the foreground and wait until its mount appears.
/// `prog` (a path, or a name looked up in PATH) as an inheritable O_PATH fd,
/// named `/proc/self/fd/N`.
fn pin_program(prog: &str) -> Result<String, String> {
    let path = if prog.contains('/') {
        std::path::PathBuf::from(prog)
    } else {
        std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(prog))
                    .find(|p| p.is_file())
            })
            .ok_or_else(|| format!("{prog} is not in PATH"))?
    };
    let fd = rustix::fs::open(&path, rustix::fs::OFlags::PATH, rustix::fs::Mode::empty())
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    Ok(format!(
        "/proc/self/fd/{}",
        std::os::fd::IntoRawFd::into_raw_fd(fd)
    ))
}

fn start_daemon(argv: &[String], pinned: Option<&str>, args: &[String], target: &Path) -> Outcome {
    let Some((prog, lead)) = argv.split_first() else {
        return Outcome::Err("no daemon command".into());
    };
    let log = match std::fs::File::create(DAEMON_LOG) {
        Ok(f) => f,
        Err(e) => return Outcome::Err(format!("daemon log: {e}")),
    };
    let mut cmd = Command::new(pinned.unwrap_or(prog));
    cmd.arg0(prog)
        .args(lead)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // The daemon dies with the trial, so no daemon outlives it.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Err(format!("cannot start {prog}: {e}")),
    };
    let start = Instant::now();
    loop {
        // A libfuse daemon mounts before it parses its own options, so a
        // mount can appear and vanish: only a stat answered by a daemon that
        // is still running counts.
        if is_fuse_mounted(target)
            && nix::sys::stat::stat(target).is_ok()
            && matches!(child.try_wait(), Ok(None))
        {
            *DAEMON.lock().expect("daemon") = Some(child);
            return Outcome::Ok;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(DAEMON_LOG).unwrap_or_default();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty() && !l.contains("unknown argument ignored"))
                .unwrap_or("");
            return Outcome::Err(format!("refused ({status}): {}", first.trim()));
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            return Outcome::Err("daemon did not mount within 10s".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// After the unmount the daemon exits by itself; give it a moment, then kill.
fn stop_daemon() {
    if let Some(mut child) = DAEMON.lock().expect("daemon").take() {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Options the daemon said it ignored ("unknown argument ignored: X").
pub fn daemon_ignored_options() -> Vec<String> {
    std::fs::read_to_string(DAEMON_LOG)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once("ignored: ").map(|(_, o)| o.trim().to_string()))
        .collect()
}

/// Whether the daemon is still alive (a crash leaves ENOTCONN behind).
pub fn daemon_status() -> Option<String> {
    let mut guard = DAEMON.lock().expect("daemon");
    let child = guard.as_mut()?;
    match child.try_wait() {
        Ok(Some(status)) => Some(format!("daemon exited: {status}")),
        _ => None,
    }
}

fn is_fuse_mounted(target: &Path) -> bool {
    let want = target.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| {
            t.lines().any(|l| {
                l.split(' ').nth(4) == Some(want.as_str())
                    && l.split_once(" - ")
                        .is_some_and(|(_, tail)| tail.starts_with("fuse"))
            })
        })
        .unwrap_or(false)
}

/// mount(2) the overlay at the stack's merged dir.
pub fn mount_overlay(stack: &Stack, opts: &str) -> Outcome {
    match mount_overlay_at(&stack.merged, opts) {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::Err(errno::name(e as i32)),
    }
}

/// mount(2) of an overlay with this option string at `target`.
pub fn mount_overlay_at(target: &Path, opts: &str) -> nix::Result<()> {
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts),
    )
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
        .rfind(|l| l.split(' ').nth(4) == Some(want.as_str()))?;
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

/// Messages the kernel left in the fs_context log of the last fsopen mount.
static MOUNT_LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub fn take_mount_log() -> Vec<String> {
    std::mem::take(&mut *MOUNT_LOG.lock().expect("mount log"))
}

/// The fsconfig calls for an option string: one per option.
pub fn params_of(opts: &str) -> Vec<String> {
    opts.split(',')
        .filter(|o| !o.is_empty())
        .map(|o| o.to_string())
        .collect()
}

/// fsopen("overlay"), one fsconfig call per parameter, create, fsmount,
/// move_mount onto the merged dir. The errno is that of the first call that
/// failed; the fs_context log is kept for the observation.
pub fn mount_fsopen(stack: &Stack, params: &[String]) -> Outcome {
    use rustix::mount::{
        fsconfig_create, fsconfig_set_fd, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen,
        move_mount,
    };
    use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};
    let err = |e: rustix::io::Errno| Outcome::Err(crate::errno::name(e.raw_os_error()));
    let fs = match fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
        Ok(fd) => fd,
        Err(e) => return err(e),
    };
    // `$LOWER*` in a parameter repeats it once for every lower layer.
    let params: Vec<String> = params
        .iter()
        .flat_map(|p| match p.contains("$LOWER*") {
            true => (0..stack.lowers.len())
                .map(|i| p.replace("$LOWER*", &format!("$LOWER{i}")))
                .collect(),
            false => vec![p.clone()],
        })
        .collect();
    let result = (|| {
        for p in &params {
            let p = expand(p, stack);
            match p.split_once('=') {
                Some((key, value)) => match value.strip_prefix("fd:") {
                    Some(path) => {
                        let fd = rustix::fs::open(
                            path,
                            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
                            rustix::fs::Mode::empty(),
                        )?;
                        fsconfig_set_fd(&fs, key, &fd)?
                    }
                    None => fsconfig_set_string(&fs, key, value)?,
                },
                None => fsconfig_set_flag(&fs, p.as_str())?,
            }
        }
        fsconfig_create(&fs)?;
        let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())?;
        move_mount(
            &mnt,
            "",
            rustix::fs::CWD,
            &stack.merged,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
    })();
    *MOUNT_LOG.lock().expect("mount log") = read_fs_log(&fs);
    match result {
        Ok(()) => Outcome::Ok,
        Err(e) => err(e),
    }
}

/// Drain the fs_context log: each read returns one message, "e overlay: …".
pub fn read_fs_log(fs: &impl std::os::fd::AsFd) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = rustix::io::read(fs, &mut buf) {
        if n == 0 {
            break;
        }
        out.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
    }
    out
}

/// Reconfigure the live mount. mount(2) MS_REMOUNT, or fspick + fsconfig +
/// FSCONFIG_CMD_RECONFIGURE; the fs_context log is kept.
pub fn remount(
    target: &Path,
    options: &[String],
    api: crate::scenario::MountApi,
) -> Result<(), nix::errno::Errno> {
    use crate::scenario::MountApi;
    match api {
        MountApi::Mount => {
            let data = options.join(",");
            mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_REMOUNT,
                Some(data.as_str()),
            )
        }
        MountApi::Fsopen => {
            use rustix::mount::{
                fsconfig_reconfigure, fsconfig_set_flag, fsconfig_set_string, fspick, FsPickFlags,
            };
            let e = |e: rustix::io::Errno| nix::errno::Errno::from_raw(e.raw_os_error());
            let fs = fspick(rustix::fs::CWD, target, FsPickFlags::FSPICK_CLOEXEC).map_err(e)?;
            let r = (|| {
                for o in options {
                    match o.split_once('=') {
                        Some((k, v)) => fsconfig_set_string(&fs, k, v)?,
                        None => fsconfig_set_flag(&fs, o.as_str())?,
                    }
                }
                fsconfig_reconfigure(&fs)
            })();
            MOUNT_LOG
                .lock()
                .expect("mount log")
                .extend(read_fs_log(&fs));
            r.map_err(e)
        }
    }
}
