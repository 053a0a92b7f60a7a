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
        Cmd::BaselineDiff { kernel } => baseline_diff(&kernel),
        Cmd::Probe => {
            let suite = match ovlconf::harness::Suite::load(&ovlconf::harness::workspace_root()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
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
                        Some(why) => println!("implementation {name}, option set {set}: refused ({why})"),
                    }
                }
            }
            ExitCode::SUCCESS
        }
    }
}

fn check(files: Vec<PathBuf>) -> ExitCode {
    let root = ovlconf::harness::workspace_root();
    let suite = match ovlconf::harness::Suite::load(&root) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
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
            let code = ovlconf::harness::main_with(libtest_mimic::Arguments::from_iter(["ovlconf report"]));
            if code != ExitCode::SUCCESS {
                eprintln!("ovlconf: the run failed; writing the reports anyway");
            }
            ovlconf::report::results_path(&root)
        }
    };
    let results: ovlconf::report::Results = match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())) {
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
    let suite = match ovlconf::harness::Suite::load(&root) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut files = vec![ovlconf::report::results_path(&root)];
    if let Ok(rd) = std::fs::read_dir(root.join("target/vm")) {
        let mut vm: Vec<PathBuf> = rd.flatten().map(|e| e.path().join("results.json")).filter(|p| p.exists()).collect();
        vm.sort();
        files.extend(vm);
    }
    let mut runs: Vec<ovlconf::report::Results> = Vec::new();
    for f in &files {
        match std::fs::read(f).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())) {
            Ok(r) => runs.push(r),
            Err(e) => eprintln!("skipping {}: {e}", f.display()),
        }
    }
    // Newest run per kernel wins.
    runs.dedup_by(|a, b| a.kernel == b.kernel);
    let spec = match ovlconf::spec::SpecIds::load(&suite.cases.join("BEHAVIOURS.md")) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let unsupported = match ovlconf::coverage::load_unsupported(&suite.cases.join("unsupported.yaml")) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let features = ovlconf::harness::features(&suite.probes);
    let md = ovlconf::coverage::render(&spec, &suite.scenarios, &runs, &unsupported, &features.missing);
    let out = root.join("reports/coverage.md");
    if let Err(e) = std::fs::create_dir_all(root.join("reports")).and_then(|()| std::fs::write(&out, md)) {
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
                println!("{} [{}]: differs from kernel {k}\n{}", c.scenario, c.set, c.diff);
            }
        }
    }
    println!("kernel {kernel}: {} pending snapshots; {same} as on the nearest older kernel, {differ} different, {alone} without an older baseline", comparisons.len());
    ExitCode::SUCCESS
}
