//! Faults from outside a trial: a FUSE daemon killed or stopped mid-trial,
//! and a whole run killed with SIGKILL. Each must end in a clean, bounded
//! failure with nothing left mounted or running.
//!
//! These run the real suite binary as root; as a plain user they are skipped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// These tests signal processes by name and count loop devices: they must
/// not overlap one another.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn have(prog: &str) -> bool {
    Command::new(prog).arg("--version").output().is_ok()
}

/// A running suite whose stdout is drained as it comes (a full pipe would
/// stall it) into a buffer the test can watch.
struct Run {
    child: Child,
    out: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Run {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait until a line of output ends with `suffix` (a trial finished).
    fn wait_for_line_ending(&self, suffix: &str, limit: Duration) {
        let start = Instant::now();
        while !self
            .out
            .lock()
            .unwrap()
            .lines()
            .any(|l| l.ends_with(suffix))
        {
            assert!(
                start.elapsed() < limit,
                "no line ending in {suffix:?} within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn suite(filter: &str, extra_env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ovlconf"));
    cmd.args(["run", "--", "--test-threads", "2", filter])
        .env("CI", "true")
        .env("INSTA_UPDATE", "no")
        .env(
            "OVLCONF_RESULTS",
            std::env::temp_dir().join(format!("ovlconf-faults-{}.json", std::process::id())),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn ovlconf");
    let stdout = child.stdout.take().expect("piped");
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = out.clone();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    Run {
        child,
        out,
        reader: Some(reader),
    }
}

/// Pids of processes whose command line contains `needle`, other than us.
fn pids_of(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

fn signal_all(needle: &str, sig: nix::sys::signal::Signal) -> usize {
    let pids = pids_of(needle);
    for p in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), sig);
    }
    pids.len()
}

fn wait_bounded(run: &mut Run, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        if run.child.try_wait().unwrap().is_some() {
            if let Some(r) = run.reader.take() {
                let _ = r.join();
            }
            return run.out.lock().unwrap().clone();
        }
        assert!(
            start.elapsed() < limit,
            "the run did not end within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_clean() {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains("/tmp/ovlconf"),
        "a trial mount is visible in the host namespace"
    );
    // Give the kernel a moment to reap what a killed namespace held.
    let start = Instant::now();
    while !pids_of("fuse-overlayfs -f").is_empty() || !pids_of("OVLCONF_CHILD").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "daemons or trial children left running: {:?}",
            pids_of("fuse-overlayfs -f")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fuse_daemon_killed_mid_trial_fails_cleanly() {
    let _serial = serial();
    if !root() || !have("fuse-overlayfs") {
        eprintln!("skipped: needs root and fuse-overlayfs");
        return;
    }
    let mut run = suite("fuse-overlayfs/", &[]);
    // Once trials run (the probe is done), kill every daemon as soon as it
    // appears, for a few seconds.
    run.wait_for_line_ending(" ok", Duration::from_secs(120));
    let start = Instant::now();
    let mut killed = 0;
    while start.elapsed() < Duration::from_secs(4) {
        killed += signal_all("fuse-overlayfs -f", nix::sys::signal::Signal::SIGKILL);
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = wait_bounded(&mut run, Duration::from_secs(300));
    assert!(killed > 0, "no daemon was ever seen");
    assert!(
        out.contains("FAILED"),
        "killing daemons failed no trial:\n{out}"
    );
    assert_clean();
}

#[test]
fn stopped_fuse_daemon_is_a_timeout_and_the_run_goes_on() {
    let _serial = serial();
    if !root() || !have("fuse-overlayfs") {
        eprintln!("skipped: needs root and fuse-overlayfs");
        return;
    }
    let mut run = suite("fuse-overlayfs/6.", &[("OVLCONF_TIMEOUT", "3")]);
    run.wait_for_line_ending(" ok", Duration::from_secs(120));
    let start = Instant::now();
    let mut stopped = 0;
    while start.elapsed() < Duration::from_secs(2) {
        stopped += signal_all("fuse-overlayfs -f", nix::sys::signal::Signal::SIGSTOP);
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = wait_bounded(&mut run, Duration::from_secs(600));
    assert!(stopped > 0, "no daemon was ever seen");
    assert!(
        out.contains("timed out after 3s"),
        "no trial reported a timeout:\n{out}"
    );
    // Trials after the stopped ones still ran and passed.
    assert!(
        out.lines().any(|l| l.ends_with(" ok")),
        "nothing passed after the hang:\n{out}"
    );
    assert_clean();
}

#[test]
fn killing_runs_repeatedly_leaves_nothing_behind() {
    let _serial = serial();
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let rounds: u32 = std::env::var("OVLCONF_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let loops_before = Command::new("losetup")
        .arg("-a")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    for i in 0..rounds {
        let mut run = suite("/default/", &[]);
        // A different moment each round: 50 to 750 ms into the run.
        std::thread::sleep(Duration::from_millis(50 + (i as u64 * 137) % 700));
        run.kill();
        assert_clean();
    }
    let loops_after = Command::new("losetup")
        .arg("-a")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    assert_eq!(loops_before, loops_after, "loop devices were left attached");
}

#[test]
fn kernel_warning_during_a_trial_fails_that_trial() {
    let _serial = serial();
    if !root() || !have("fuse-overlayfs") || std::fs::metadata("/dev/kmsg").is_err() {
        eprintln!("skipped: needs root, fuse-overlayfs and /dev/kmsg");
        return;
    }
    // A stopped daemon holds its trial open for the timeout; a WARNING
    // logged meanwhile belongs to that trial.
    let mut run = suite("/default/whiteout/", &[("OVLCONF_TIMEOUT", "3")]);
    run.wait_for_line_ending(" ok", Duration::from_secs(120));
    let marker = format!("ovlconf-kmsg-self-test-{}", std::process::id());
    let start = Instant::now();
    let mut stopped = 0;
    let mut logged = false;
    while start.elapsed() < Duration::from_secs(2) {
        stopped += signal_all("fuse-overlayfs -f", nix::sys::signal::Signal::SIGSTOP);
        if stopped > 0 && !logged {
            // A record shaped like a WARN() splat, marked as this test's.
            std::fs::write(
                "/dev/kmsg",
                format!(
                    "WARNING: CPU: 0 PID: 0 at {marker} (injected by harness/tests/faults.rs)\n"
                ),
            )
            .expect("write /dev/kmsg");
            logged = true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = wait_bounded(&mut run, Duration::from_secs(600));
    assert!(logged, "no daemon was ever seen to stop");
    assert!(
        out.contains(&marker) && out.contains("problem record(s) during this trial"),
        "no trial reported the kernel warning:\n{out}"
    );
    assert_clean();
}

#[test]
fn two_runs_at_the_same_time_do_not_interfere() {
    let _serial = serial();
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    // Same trials, same workspace, same moment: each trial has its own
    // namespaces and /tmp, so both runs must agree trial by trial.
    let results = |tag: &str| {
        std::env::temp_dir().join(format!("ovlconf-twin-{tag}-{}.json", std::process::id()))
    };
    let spawn = |tag: &str| {
        Command::new(env!("CARGO_BIN_EXE_ovlconf"))
            .args(["run", "--", "--test-threads", "2", "/whiteout/"])
            .env("CI", "true")
            .env("INSTA_UPDATE", "no")
            .env("OVLCONF_IMPLEMENTATIONS", "kernel")
            .env("OVLCONF_RESULTS", results(tag))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ovlconf")
    };
    let (mut a, mut b) = (spawn("a"), spawn("b"));
    let (sa, sb) = (a.wait().unwrap(), b.wait().unwrap());
    let outcome = |tag: &str| -> Vec<(String, String)> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(results(tag)).expect("results file")).unwrap();
        let mut out: Vec<(String, String)> = v["trials"]
            .as_array()
            .expect("trials")
            .iter()
            .map(|t| (t["name"].to_string(), t["status"].to_string()))
            .collect();
        out.sort();
        out
    };
    let (ra, rb) = (outcome("a"), outcome("b"));
    assert!(!ra.is_empty(), "the first run ran no trial");
    assert_eq!(ra, rb, "the two runs disagree");
    assert!(sa.success() && sb.success(), "a run failed: {sa} / {sb}");
    assert_clean();
}
