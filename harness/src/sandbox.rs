//! Isolation: every trial runs in a child process of its own, in a private
//! mount namespace (and a user namespace for unprivileged sets), with a fresh
//! tmpfs over /tmp. When the child ends, however it ends, the kernel tears
//! its namespace down, and every mount and loop device (autoclear) with it.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde::{de::DeserializeOwned, Serialize};

/// The environment variable that turns a harness binary into a trial child.
pub const CHILD_ENV: &str = "OVLCONF_CHILD";

/// How a sandboxed child should set up its namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Privilege {
    /// Real root: a private mount namespace only.
    Root,
    /// A new user namespace mapping ids 0..65535 to an unused host range.
    UsernsMapped,
    /// Not root: a user namespace mapping only our own uid/gid to 0.
    UsernsSelf,
}

/// What a child sends back on stdout.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum ChildReply<T> {
    Done(T),
    /// Setup went wrong before anything could be observed.
    Broken(String),
}

/// Run `job` (serialised) in a sandboxed child of the current executable.
/// A child that outlives `timeout` is killed with its whole namespace.
pub fn run_child<J: Serialize, T: DeserializeOwned>(
    job: &J,
    timeout: Duration,
) -> Result<T, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let payload = serde_json::to_string(job).map_err(|e| e.to_string())?;
    let parent = std::process::id();
    let mut cmd = Command::new(exe);
    cmd.env(CHILD_ENV, payload)
        .env("OVLCONF_PARENT", parent.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // The child dies with the thread that spawned it, so a killed run
            // leaves no trial behind.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // Its own process group, so a timeout kills helpers too.
            nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))
                .map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawning trial child: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let mut nap = Duration::from_micros(200);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if start.elapsed() > timeout => {
                let pgid = Pid::from_raw(-(child.id() as i32));
                let _ = nix::sys::signal::kill(pgid, Signal::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "timed out after {}s: killed the trial and its namespace",
                    timeout.as_secs()
                ));
            }
            Ok(None) => {
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(5));
            }
            Err(e) => break Err(format!("waiting for trial child: {e}")),
        }
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let status = status?;
    let reply: Result<ChildReply<T>, _> = serde_json::from_slice(&out);
    match reply {
        Ok(ChildReply::Done(t)) => Ok(t),
        Ok(ChildReply::Broken(msg)) => Err(msg),
        Err(_) => Err(format!(
            "trial child ended with {status} and no result; stderr:\n{}",
            String::from_utf8_lossy(&err).trim()
        )),
    }
}

/// Child side: read the job, `prepare` it (still seeing the host's files:
/// the cases may live under /tmp, which the sandbox covers), enter the
/// namespaces, run `body`, reply, exit. Never returns.
pub fn child_main<J: DeserializeOwned, S, T: Serialize>(
    payload: &str,
    prepare: impl FnOnce(J) -> Result<(Privilege, S), String>,
    body: impl FnOnce(S) -> Result<T, String>,
) -> ! {
    let reply = (|| {
        let job: J = serde_json::from_str(payload).map_err(|e| format!("bad child job: {e}"))?;
        if let Some(parent) = std::env::var("OVLCONF_PARENT")
            .ok()
            .and_then(|p| p.parse::<i32>().ok())
        {
            // pdeathsig races with a parent that died before it was set.
            if nix::unistd::getppid().as_raw() != parent {
                std::process::exit(1);
            }
        }
        let (privilege, state) = prepare(job)?;
        enter(privilege)?;
        body(state)
    })();
    let reply = match reply {
        Ok(t) => ChildReply::Done(t),
        Err(e) => ChildReply::Broken(e),
    };
    let text = serde_json::to_string(&reply).unwrap_or_else(|e| format!("{{\"Broken\":\"{e}\"}}"));
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    std::process::exit(0)
}

/// Enter the namespaces and cover /tmp with a private tmpfs.
fn enter(privilege: Privilege) -> Result<(), String> {
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    match privilege {
        Privilege::Root => {
            unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?
        }
        Privilege::UsernsMapped => enter_mapped_userns()?,
        Privilege::UsernsSelf => {
            let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
            unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
                .map_err(|e| format!("unshare(CLONE_NEWUSER): {e}"))?;
            std::fs::write("/proc/self/uid_map", format!("0 {uid} 1"))
                .map_err(|e| format!("uid_map: {e}"))?;
            std::fs::write("/proc/self/setgroups", "deny")
                .map_err(|e| format!("setgroups: {e}"))?;
            std::fs::write("/proc/self/gid_map", format!("0 {gid} 1"))
                .map_err(|e| format!("gid_map: {e}"))?;
        }
    }
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making / private: {e}"))?;
    std::fs::create_dir_all("/tmp").map_err(|e| format!("/tmp: {e}"))?;
    mount(
        Some("tmpfs"),
        "/tmp",
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=1777"),
    )
    .map_err(|e| format!("trial tmpfs on /tmp: {e}"))?;
    Ok(())
}

/// First host id of the range a mapped user namespace gets.
pub const USERNS_HOST_BASE: u32 = 100_000;

/// A host uid and gid just past the mapped range: no id inside maps to it.
pub const UNMAPPED_HOST_ID: u32 = USERNS_HOST_BASE + 65_536;

/// Inside a mapped user namespace: the pipes to the process outside it that
/// does what only the initial namespace may (write end, answer read end).
static OUTSIDE: std::sync::OnceLock<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> =
    std::sync::OnceLock::new();

/// Give `path` (inside this trial) the unmapped host owner, done by the
/// process outside the user namespace. Only in a mapped user namespace, on
/// a filesystem from [`mount_from_outside`]: one mounted inside the
/// namespace cannot hold ids the namespace does not map.
pub fn chown_from_outside(path: &std::path::Path) -> std::io::Result<()> {
    ask_outside("chown", path)
}

/// A tmpfs at `path` mounted by the process outside the user namespace
/// (so it belongs to the initial one), its root owned by the namespace's
/// root.
pub fn mount_from_outside(path: &std::path::Path) -> std::io::Result<()> {
    ask_outside("mount", path)
}

fn ask_outside(what: &str, path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let Some((request, answer)) = OUTSIDE.get() else {
        return Err(std::io::Error::other(
            "an owner outside the user namespace needs a user-namespace option set",
        ));
    };
    let mut line = format!("{what} ").into_bytes();
    line.extend_from_slice(path.as_os_str().as_bytes());
    line.push(b'\n');
    nix::unistd::write(request, &line)?;
    let mut code = [0u8; 1];
    nix::unistd::read(answer, &mut code)?;
    match code[0] {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e as i32)),
    }
}

/// Outside the namespace: serve the child's requests until it closes its
/// end (it exits). The first request moves this process into the child's
/// mount namespace, so nothing here touches the host's.
fn serve_outside(child: Pid, requests: std::os::fd::OwnedFd, answers: std::os::fd::OwnedFd) {
    use std::io::BufRead;
    let reader = std::io::BufReader::new(std::fs::File::from(requests));
    let mut joined = false;
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let (what, path) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let r = (|| -> nix::Result<()> {
            if !joined {
                let ns = std::fs::File::open(format!("/proc/{child}/ns/mnt"))
                    .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(5)))?;
                nix::sched::setns(ns, CloneFlags::CLONE_NEWNS)?;
                joined = true;
            }
            let id = Some(UNMAPPED_HOST_ID);
            match what {
                "chown" => nix::unistd::fchownat(
                    nix::fcntl::AT_FDCWD,
                    path,
                    id.map(nix::unistd::Uid::from_raw),
                    id.map(nix::unistd::Gid::from_raw),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                ),
                "mount" => mount(
                    Some("tmpfs"),
                    path,
                    Some("tmpfs"),
                    MsFlags::empty(),
                    Some(
                        format!("mode=0755,uid={USERNS_HOST_BASE},gid={USERNS_HOST_BASE}").as_str(),
                    ),
                ),
                _ => Err(nix::errno::Errno::EINVAL),
            }
        })();
        let code = match r {
            Ok(()) => 0u8,
            Err(e) => (e as i32).clamp(1, 255) as u8,
        };
        if nix::unistd::write(&answers, &[code]).is_err() {
            break;
        }
    }
}

/// As root, map 0..65535 inside to an unused host range. Only a process
/// outside the new namespace may write such a map, so we fork: the
/// grandchild unshares, this process writes its maps and then waits for it,
/// passing its exit status on.
fn enter_mapped_userns() -> Result<(), String> {
    let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    let (go_r, go_w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    // Close-on-exec: programs the trial starts must not hold the requests
    // open (the process outside waits for their end).
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (request_r, request_w) = nix::unistd::pipe2(cloexec).map_err(|e| e.to_string())?;
    let (answer_r, answer_w) = nix::unistd::pipe2(cloexec).map_err(|e| e.to_string())?;
    // SAFETY: the trial child is single-threaded.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(ready_r);
            drop(go_w);
            drop(request_r);
            drop(answer_w);
            let _ = OUTSIDE.set((request_w, answer_r));
            unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
                .map_err(|e| format!("unshare(CLONE_NEWUSER): {e}"))?;
            nix::unistd::write(&ready_w, b"u").map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            let n = nix::unistd::read(&go_r, &mut b).map_err(|e| e.to_string())?;
            if n != 1 || b[0] != b'm' {
                return Err("parent could not write the id maps".into());
            }
            nix::unistd::setresgid(0.into(), 0.into(), 0.into())
                .map_err(|e| format!("setresgid: {e}"))?;
            nix::unistd::setresuid(0.into(), 0.into(), 0.into())
                .map_err(|e| format!("setresuid: {e}"))?;
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
            Ok(())
        }
        ForkResult::Parent { child } => {
            drop(ready_w);
            drop(go_r);
            drop(request_w);
            drop(answer_r);
            let mut b = [0u8; 1];
            let ok = nix::unistd::read(&ready_r, &mut b)
                .map(|n| n == 1)
                .unwrap_or(false);
            let map = format!("0 {USERNS_HOST_BASE} 65536");
            let wrote = ok
                && std::fs::write(format!("/proc/{child}/uid_map"), &map).is_ok()
                && std::fs::write(format!("/proc/{child}/gid_map"), &map).is_ok();
            let _ = nix::unistd::write(&go_w, if wrote { b"m" } else { b"x" });
            serve_outside(child, request_r, answer_w);
            // Pass on the grandchild's stdout verbatim (it is ours: inherited).
            let code = match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, c)) => c,
                _ => 1,
            };
            std::process::exit(code)
        }
    }
}

/// True when this process may mount in the initial user namespace.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
