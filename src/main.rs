//! The `elbo` command line: train, evaluate, sample and reconstruct (the commands are in
//! `src/cli/`; this file sets up the process and turns errors into one line).

mod cli;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, run};

/// mimalloc keeps freed tensor buffers for reuse instead of returning them to the system, so an
/// eager training step stops paying a page fault per fresh buffer (measured: see bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    elbo::alloc::keep_freed_memory();
    // candle asks for its thread count on every matrix product, and without RAYON_NUM_THREADS
    // that means reading /proc/cpuinfo each time (3% of a U-Net step): answer it once.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: first statement of main, before any other thread exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    // Errors are one line whatever the shell sets: RUST_BACKTRACE=1 (common in developers'
    // shells) would make candle and anyhow capture a backtrace into every error message.
    // Panics still honour RUST_BACKTRACE; RUST_LIB_BACKTRACE=1 brings error backtraces back.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: as above, no other thread exists yet.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                let _ = e.print();
                return if e.use_stderr() {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            let text = e.render().to_string();
            eprintln!(
                "{} (see --help)",
                text.lines().next().unwrap_or("error: bad arguments")
            );
            return ExitCode::from(2);
        }
    };
    // MPI (with the `mpi` feature, under mpirun) or one process; finalised when this drops.
    let _process_group = match elbo::collective::init() {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let world = elbo::collective::world();
            let message = format!("{e:#}").replace('\n', " ");
            if world.world_size() > 1 {
                // The other ranks would wait for this one in their next collective: end the
                // whole job, saying which rank failed.
                eprintln!(
                    "error: rank {} of {}: {message}; ending every rank",
                    world.rank(),
                    world.world_size()
                );
                world.abort(1);
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
