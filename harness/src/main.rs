//! The `ovlconf` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ovlconf", about = "Conformance suite for Linux overlayfs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the conformance trials (takes the same arguments as `cargo test`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Check scenario files without running them (default: all of cases/).
    Check { files: Vec<PathBuf> },
    /// Probe the running kernel's features and print them.
    Probe,
    /// Compare the pending snapshots of a kernel that has no baselines with
    /// the nearest older kernel's baselines, scenario by scenario.
    BaselineDiff {
        /// The kernel, as major.minor (e.g. 6.19).
        #[arg(long)]
        kernel: String,
    },
    /// Measure the suite against the syscall floor, per stage, and how it
    /// scales with trials, layer size and layer count.
    Bench {
        /// Skip the full-suite run (floor and scaling only).
        #[arg(long)]
        quick: bool,
    },
    /// Print the JSON Schema of the scenario format (the committed copy is
    /// cases/scenario.schema.json).
    Schema,
    /// Write the conformance matrix as one self-contained HTML page, from
    /// target/ovlconf/results.json and target/vm/*/results.json.
    Html {
        /// Where to write it (default: reports/matrix.html in the workspace).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write reports/coverage.md from the last host run and the VM runs.
    Coverage,
    /// Run every trial (or read a results file) and write reports/.
    Report {
        /// Use this results file instead of running the suite.
        #[arg(long)]
        from: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    ovlconf::harness::dispatch_child();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { args } => {
            let mut argv = vec!["ovlconf run".to_string()];
            argv.extend(args);
            ovlconf::harness::main_with(libtest_mimic::Arguments::from_iter(argv))
        }
        Cmd::Check { files } => check(files),
        Cmd::Report { from } => report(from),
        Cmd::Coverage => coverage(),
        Cmd::Schema => {
            print!("{}", ovlconf::schema::scenario_schema());
            ExitCode::SUCCESS
        }
        Cmd::Html { out } => html(out),
        Cmd::Bench { quick } => bench(quick),
        Cmd::BaselineDiff { kernel } => baseline_diff(&kernel),
        Cmd::Probe => {
            let Some(suite) = load_suite(&ovlconf::harness::workspace_root()) else {
                return ExitCode::FAILURE;
            };
            let f = ovlconf::harness::features(&suite.probes);
            for name in &f.present {
                println!("{name}: yes");
            }
            for (name, why) in &f.missing {
                println!("{name}: no ({why})");
            }
            for (name, why) in &suite.unavailable {
                println!("implementation {name}: unavailable ({why})");
            }
            for (name, sets) in &f.implementation_sets {
                for (set, r) in sets {
                    match r {
                        None => println!("implementation {name}, option set {set}: accepted"),
                        Some(why) => {
                            println!("implementation {name}, option set {set}: refused ({why})")
                        }
                    }
                }
            }
            ExitCode::SUCCESS
        }
    }
}

fn check(files: Vec<PathBuf>) -> ExitCode {
    let root = ovlconf::harness::workspace_root();
    let Some(suite) = load_suite(&root) else {
        return ExitCode::FAILURE;
    };
    let mut bad = 0;
    for e in &suite.load_errors {
        if files.is_empty() || files.iter().any(|f| e.file.ends_with(f)) {
            eprintln!("{e}");
            bad += 1;
        }
    }
    println!(
        "{} scenario(s) loaded, {bad} with errors",
        suite.scenarios.len()
    );
    if bad > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn report(from: Option<PathBuf>) -> ExitCode {
    let root = ovlconf::harness::workspace_root();
    let path = match from {
        Some(p) => p,
        None => {
            let code = ovlconf::harness::main_with(libtest_mimic::Arguments::from_iter([
                "ovlconf report",
            ]));
            if code != ExitCode::SUCCESS {
                eprintln!("ovlconf: the run failed; writing the reports anyway");
            }
            ovlconf::report::results_path(&root)
        }
    };
    let results: ovlconf::report::Results = match std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ovlconf: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    match ovlconf::report::write_markdown(&results, &root.join("reports")) {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ovlconf: writing reports: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads target/ovlconf/results.json and target/vm/*/results.json.
fn coverage() -> ExitCode {
    let root = ovlconf::harness::workspace_root();
    let Some(suite) = load_suite(&root) else {
        return ExitCode::FAILURE;
    };
    let mut runs = load_results(&ovlconf::report::results_files(&root));
    // Newest run per kernel wins.
    runs.dedup_by(|a, b| a.kernel == b.kernel);
    let spec = match ovlconf::spec::SpecIds::load(&suite.cases.join("BEHAVIOURS.md")) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let unsupported =
        match ovlconf::coverage::load_unsupported(&suite.cases.join("unsupported.yaml")) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
    let features = ovlconf::harness::features(&suite.probes);
    let md = ovlconf::coverage::render(
        &spec,
        &suite.scenarios,
        &runs,
        &unsupported,
        &features.missing,
    );
    let out = root.join("reports/coverage.md");
    if let Err(e) =
        std::fs::create_dir_all(root.join("reports")).and_then(|()| std::fs::write(&out, md))
    {
        eprintln!("{}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    println!("wrote {}", out.display());
    ExitCode::SUCCESS
}

fn baseline_diff(kernel: &str) -> ExitCode {
    let cases = ovlconf::harness::workspace_root().join("cases");
    let comparisons = ovlconf::baseline::compare(&cases, kernel);
    let (mut same, mut differ, mut alone) = (0, 0, 0);
    for c in &comparisons {
        match (&c.against, c.diff.is_empty()) {
            (None, _) => {
                alone += 1;
                println!("{} [{}]: no older baseline", c.scenario, c.set);
            }
            (Some(_), true) => same += 1,
            (Some(k), false) => {
                differ += 1;
                println!(
                    "{} [{}]: differs from kernel {k}\n{}",
                    c.scenario, c.set, c.diff
                );
            }
        }
    }
    println!("kernel {kernel}: {} pending snapshots; {same} as on the nearest older kernel, {differ} different, {alone} without an older baseline", comparisons.len());
    ExitCode::SUCCESS
}

fn bench(quick: bool) -> ExitCode {
    use ovlconf::harness::{ChildJob, ChildResult};
    use std::time::{Duration, Instant};
    let root = ovlconf::harness::workspace_root();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        * 2;
    let child = |job: ChildJob| {
        ovlconf::sandbox::run_child::<_, ChildResult>(&job, Duration::from_secs(1800))
    };
    println!(
        "machine: {} cores, kernel {}",
        threads / 2,
        ovlconf::harness::kernel_release()
    );

    // 1. The floor, with the harness's parallelism.
    let per_thread = 100;
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                ovlconf::sandbox::run_child::<_, ChildResult>(
                    &ChildJob::Floor {
                        iterations: per_thread,
                        files: 5,
                    },
                    Duration::from_secs(600),
                )
            })
        })
        .collect();
    for h in handles {
        if let Ok(Err(e)) = h.join() {
            eprintln!("floor: {e}");
            return ExitCode::FAILURE;
        }
    }
    let floor_rate = (threads * per_thread) as f64 / start.elapsed().as_secs_f64();
    println!(
        "floor: {} bare trial loops on {threads} threads: {floor_rate:.0} trials/s",
        threads * per_thread
    );

    // 2. The harness: trial-count scaling, then the whole host matrix.
    let mut filters: Vec<(&str, Option<&str>)> = vec![
        ("kernel, one option set", Some("kernel/6")),
        ("kernel, all option sets", Some("kernel/")),
    ];
    if quick {
        filters.truncate(1);
    } else {
        filters.push(("every implementation", None));
    }
    let results_path = ovlconf::report::results_path(&root);
    for (label, filter) in filters {
        let mut argv = vec!["ovlconf bench".to_string(), "-q".to_string()];
        if let Some(f) = filter {
            argv.push(f.to_string());
        }
        if label == "kernel, one option set" {
            argv.push("--skip".into());
            argv.push("/samefs/".into());
            for set in [
                "redirect_dir",
                "index",
                "xino",
                "metacopy",
                "nfs_export",
                "volatile",
                "userxattr",
            ] {
                argv.push("--skip".into());
                argv.push(format!("/{set}/"));
            }
        }
        let start = Instant::now();
        let _ = ovlconf::harness::main_with(libtest_mimic::Arguments::from_iter(argv));
        let wall = start.elapsed().as_secs_f64();
        let Ok(results) = std::fs::read(&results_path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                serde_json::from_slice::<ovlconf::report::Results>(&b).map_err(|e| e.to_string())
            })
        else {
            eprintln!("no results");
            return ExitCode::FAILURE;
        };
        let ran: Vec<_> = results
            .trials
            .iter()
            .filter(|t| t.status != ovlconf::report::Status::Skip)
            .collect();
        let steps: usize = ran.iter().map(|t| t.steps).sum();
        let rate = ran.len() as f64 / wall;
        println!(
            "harness ({label}): {} trials ({} skipped) in {wall:.1}s: {rate:.1} trials/s, {:.0} steps/s, {:.2} ms per trial; harness/floor = {:.0}%",
            ran.len(),
            results.trials.len() - ran.len(),
            steps as f64 / wall,
            wall * 1000.0 / ran.len().max(1) as f64,
            100.0 * rate / floor_rate
        );
        let mut stages: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        for t in &ran {
            for (k, v) in &t.stages_us {
                *stages.entry(k.clone()).or_default() += v;
            }
        }
        let total: u64 = stages.values().sum::<u64>() + results.parse_us;
        println!("  time per stage, summed over trials (threads overlap):");
        println!(
            "    {:<24} {:>9.3}s {:>5.1}%",
            "parse",
            results.parse_us as f64 / 1e6,
            100.0 * results.parse_us as f64 / total.max(1) as f64
        );
        for (k, v) in &stages {
            println!(
                "    {k:<24} {:>9.3}s {:>5.1}%",
                *v as f64 / 1e6,
                100.0 * *v as f64 / total.max(1) as f64
            );
        }
    }

    // 3. Layer size and layer count.
    for (files, layers) in [
        (10_000, 1),
        (100_000, 1),
        (1, 1),
        (10, 10),
        (100, 100),
        (500, 500),
    ] {
        match child(ChildJob::Scale { files, layers }) {
            Ok(ChildResult::Scale(r)) => println!(
                "stack of {files} files in {layers} lower layer(s): build {:.3}s ({:.1} us/file), mount {:.3}s, observe {:.3}s ({:.1} us/object, {} objects)",
                r.build_s,
                r.build_s * 1e6 / files as f64,
                r.mount_s,
                r.observe_s,
                r.observe_s * 1e6 / r.observed.max(1) as f64,
                r.observed
            ),
            Ok(_) => {}
            Err(e) => println!("stack of {files} files in {layers} layers: {e}"),
        }
    }
    ExitCode::SUCCESS
}

fn load_results(files: &[PathBuf]) -> Vec<ovlconf::report::Results> {
    let mut runs = Vec::new();
    for f in files {
        match std::fs::read(f)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => runs.push(r),
            Err(e) => eprintln!("skipping {}: {e}", f.display()),
        }
    }
    runs
}

fn html(out: Option<PathBuf>) -> ExitCode {
    let root = ovlconf::harness::workspace_root();
    let runs = load_results(&ovlconf::report::results_files(&root));
    if runs.is_empty() {
        eprintln!("ovlconf: no results files (run `ovlconf run` or ci/vm/run-kernel first)");
        return ExitCode::FAILURE;
    }
    let out = out.unwrap_or_else(|| root.join("reports/matrix.html"));
    let page = ovlconf::html::render(&runs);
    if let Err(e) = out
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&out, page))
    {
        eprintln!("ovlconf: {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    println!("wrote {} ({} results file(s))", out.display(), runs.len());
    ExitCode::SUCCESS
}

/// The suite of the workspace, or None after saying why not.
fn load_suite(root: &std::path::Path) -> Option<ovlconf::harness::Suite> {
    ovlconf::harness::Suite::load(root)
        .map_err(|e| eprintln!("{e}"))
        .ok()
}
