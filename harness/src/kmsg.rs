//! The kernel's side of a trial: oops, WARN and BUG records that appear in
//! the kernel log while it runs, and taint bits it gains. Both fail the
//! trial. Trials run in parallel, so a record is attributed to every trial
//! that was running when it was logged; the message names the others (run
//! with `--test-threads 1` to pin it to one).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

/// Texts that mark a kernel problem rather than overlay's normal warnings
/// (`overlayfs: …` messages are expected and ignored).
const PROBLEMS: &[&str] = &[
    "WARNING:",
    "BUG:",
    "kernel BUG at",
    "Oops",
    "general protection fault",
    "Call Trace:",
    "UBSAN:",
    "KASAN:",
    "list_add corruption",
    "list_del corruption",
    "blocked for more than",
    "Kernel panic",
    "RCU stall",
];

/// Trials running now, to name the company a record was logged in.
static RUNNING: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Watches the kernel log and taint from a trial's start to its end.
pub struct Watch {
    name: String,
    log: Option<File>,
    taint: Option<u64>,
    company: BTreeSet<String>,
}

impl Watch {
    pub fn start(trial: &str) -> Watch {
        let log = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .ok()
            .and_then(|f| {
                // Only records logged from now on.
                rustix::fs::seek(&f, rustix::fs::SeekFrom::End(0)).ok()?;
                Some(f)
            });
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        let company = running.clone();
        running.insert(trial.to_string());
        Watch {
            name: trial.to_string(),
            log,
            taint: taint(),
            company,
        }
    }

    /// What went wrong in the kernel while the trial ran, if anything.
    pub fn finish(mut self) -> Option<String> {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        running.remove(&self.name);
        self.company.extend(running.iter().cloned());
        drop(running);
        let mut out = Vec::new();
        let records = self.log.as_mut().map(read_records).unwrap_or_default();
        let problems: Vec<&String> = records
            .iter()
            .filter(|r| PROBLEMS.iter().any(|p| r.contains(p)))
            .collect();
        if !problems.is_empty() {
            out.push(format!(
                "the kernel logged {} problem record(s) during this trial:\n    {}",
                problems.len(),
                problems
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join("\n    ")
            ));
        }
        if let (Some(before), Some(after)) = (self.taint, taint()) {
            if after & !before != 0 {
                out.push(format!(
                    "the kernel became tainted during this trial: {before} -> {after} (new bits {:#x})",
                    after & !before
                ));
            }
        }
        if out.is_empty() {
            return None;
        }
        if !self.company.is_empty() {
            let others: Vec<&String> = self.company.iter().take(8).collect();
            out.push(format!(
                "trials running at the same time (rerun with --test-threads 1 to tell them apart): {others:?}"
            ));
        }
        Some(out.join("\n"))
    }
}

/// /proc/sys/kernel/tainted.
pub fn taint() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/kernel/tainted")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Each read of /dev/kmsg returns one record: `prio,seq,usec,flags;text`.
fn read_records(f: &mut File) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                let text = rec.split_once(';').map(|(_, t)| t).unwrap_or(&rec);
                // Continuation lines (" KEY=value") are metadata.
                out.push(text.lines().next().unwrap_or("").trim().to_string());
            }
            // EPIPE: records were overwritten meanwhile; go on reading.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    out
}
