//! `cargo test`: every scenario × option set against the running kernel.

fn main() -> std::process::ExitCode {
    ovlconf::harness::main_with(libtest_mimic::Arguments::from_args())
}
