//! `cargo xtask`: build, run and deploy this repository so that what runs is
//! exactly what was committed.

mod commands;
mod config;
mod docker;
mod exec;
mod git;
mod kube;
mod registry;
mod time;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xshell::Shell;

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", version, about, propagate_version = true)]
struct Cli {
    /// Print the commands that would change anything, run none of them
    #[arg(long, global = true)]
    dry_run: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Build(commands::build::Build),
    Bench(commands::bench::Bench),
    Deploy(commands::deploy::Deploy),
    Up(commands::up::Up),
    Down(commands::down::Down),
    Mirror(commands::mirror::Mirror),
    Test(commands::test::Test),
    Ci(commands::ci::Ci),
}

fn main() -> ExitCode {
    // clap exits by itself: 0 for --help/--version, 2 for usage errors.
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(exec::exit_code(&error))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let sh = Shell::new()?;
    let exec = exec::Exec::new(&sh, cli.dry_run);
    match cli.command {
        Command::Build(cmd) => cmd.run(&exec),
        Command::Bench(cmd) => cmd.run(&exec),
        Command::Deploy(cmd) => cmd.run(&exec),
        Command::Up(cmd) => cmd.run(&exec),
        Command::Down(cmd) => cmd.run(&exec),
        Command::Mirror(cmd) => cmd.run(&exec),
        Command::Test(cmd) => cmd.run(&exec),
        Command::Ci(cmd) => cmd.run(&exec),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
