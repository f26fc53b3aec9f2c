//! `cargo xtask`: build, run and deploy this repository so that what runs is
//! exactly what was committed.
//!
//! The pipeline is source -> image -> registry -> cluster; the modules form
//! layers, top to bottom, and each uses only the modules on its own line or
//! below (`tests/layers.rs` checks that, and that no two modules use each
//! other). The environment is read once (`env`) and passed down inside
//! `Exec`, with the output and the cancellation token; processes are made
//! only in `exec` (clippy's `disallowed-methods`, `clippy.toml`).
//!
//! ```text
//! main                                     the CLI: reads Env, makes Output and Cancel, dispatches
//! commands                                 one thin file per subcommand: flags -> the layers below
//! rollout                                  apply in order, wait failing fast, roll back, record
//! lock, footprint, remote                  the deploy's lease; what tests leave; BuildKit as a service
//! history                                  the deploy history, kept in the cluster
//! snapshot, health, cluster                what was applied; what a pod's state means; the test cluster
//! kube                                     kubectl's verbs (every kubectl line) and the API's types
//! docker                                   plan and run a build: the commit's tree -> images
//! push, builder                            push with retries, immutable tags; the pinned BuildKit
//! bake, deps                               the bake file, input keys, tags; dependency stores
//! bases, progress, labels                  base images; BuildKit's progress; labels on what is made
//! registry, export                         probe, resolve, log in; the commit's tree as the context
//! git, setup, pki, gomod, registry_delete  the revision; installing a machine; certificates; Go wrappers
//! config, cache                            the schema and its merge; the cache's paths, checked
//! exec                                     every command: echoed and run, or (dry run) only printed
//! output, cancel                           human lines and JSON events; the cancellation token
//! env, exit, time, base64                  the environment, read once; exit codes; time; base64
//! ```

mod bake;
mod base64;
mod bases;
mod builder;
mod cache;
mod cancel;
mod cluster;
mod commands;
mod config;
mod deps;
mod docker;
mod env;
mod exec;
mod exit;
mod export;
mod footprint;
mod git;
mod gomod;
mod health;
mod history;
mod kube;
mod labels;
mod lock;
mod output;
mod pki;
mod progress;
mod push;
mod registry;
mod registry_delete;
mod remote;
mod rollout;
mod setup;
mod snapshot;
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
    /// Newline-delimited JSON events on stdout (schema in the README); human output stays on stderr
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Build(commands::build::Build),
    Builder(commands::builder::Builder),
    Bench(commands::bench::Bench),
    Cluster(commands::cluster::Cluster),
    Deploy(commands::deploy::Deploy),
    Status(commands::status::Status),
    Verify(commands::verify::Verify),
    Rollback(commands::rollback::Rollback),
    Up(commands::up::Up),
    Down(commands::down::Down),
    Mirror(commands::mirror::Mirror),
    Clean(commands::clean::Clean),
    Test(commands::test::Test),
    Ci(commands::ci::Ci),
}

fn main() -> ExitCode {
    // clap exits by itself: 0 for --help/--version, 2 for usage errors.
    let cli = Cli::parse();
    let env = env::Env::capture();
    let output = output::Output::new(cli.json, env.plain_output());
    let started = std::time::Instant::now();
    let cancel = cancel::Cancel::default();
    let outcome = run(cli, output, env, cancel.clone());
    let mut code = outcome.as_ref().err().map_or(0, exit::exit_code);
    // A child killed by the same Ctrl-C fails its own way; the cause is the
    // interrupt.
    if code != 0 && cancel.interrupted() {
        code = 130;
    }
    let error = outcome.as_ref().err().map(|e| format!("{e:#}"));
    if let Some(error) = &error {
        eprintln!("{} {error}", output.paint(output::RED, "error:"));
    }
    output.event(
        "result",
        serde_json::json!({
            "ok": code == 0,
            "exit_code": code,
            "error": error,
            "seconds": started.elapsed().as_secs_f64(),
        }),
    );
    ExitCode::from(code)
}

fn run(
    cli: Cli,
    output: output::Output,
    env: env::Env,
    cancel: cancel::Cancel,
) -> anyhow::Result<()> {
    let sh = Shell::new()?;
    let exec = exec::Exec::new(&sh, cli.dry_run, output, env, cancel);
    match cli.command {
        Command::Build(cmd) => cmd.run(&exec),
        Command::Builder(cmd) => cmd.run(&exec),
        Command::Bench(cmd) => cmd.run(&exec),
        Command::Cluster(cmd) => cmd.run(&exec),
        Command::Deploy(cmd) => cmd.run(&exec),
        Command::Status(cmd) => cmd.run(&exec),
        Command::Verify(cmd) => cmd.run(&exec),
        Command::Rollback(cmd) => cmd.run(&exec),
        Command::Up(cmd) => cmd.run(&exec),
        Command::Down(cmd) => cmd.run(&exec),
        Command::Mirror(cmd) => cmd.run(&exec),
        Command::Clean(cmd) => cmd.run(&exec),
        Command::Test(cmd) => cmd.run(&exec),
        Command::Ci(cmd) => cmd.run(&exec),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }

    /// Every `cargo xtask ...` line the README and `docs/` show, in code
    /// spans and code blocks, with placeholders (`<name>`, `[...]`, `N`)
    /// filled in: the words after `cargo xtask`.
    fn documented_command_lines() -> Vec<(String, Vec<String>)> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = vec![root.join("README.md")];
        let docs = std::fs::read_dir(root.join("docs")).unwrap();
        files.extend(docs.map(|entry| entry.unwrap().path()));
        let mut found = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            // Code spans and code block lines alike: each piece between
            // backticks, and each line.
            let pieces = text.split('`').flat_map(|piece| piece.lines());
            for piece in pieces {
                let Some((_, after)) = piece.split_once("cargo xtask") else {
                    continue;
                };
                let line = after
                    .split(['#', '|', ';'])
                    .next()
                    .unwrap()
                    .split("&&")
                    .next()
                    .unwrap();
                let mut line = line.to_owned();
                while let Some(start) = line.find('<') {
                    let Some(end) = line[start..].find('>') else {
                        break;
                    };
                    line.replace_range(start..=start + end, "x");
                }
                let words: Vec<String> = line
                    .replace(['[', ']'], " ")
                    .replace("...", " ")
                    .split_whitespace()
                    .map(|word| match word {
                        "N" => "1".to_owned(),
                        _ => word.to_owned(),
                    })
                    .collect();
                if !words.is_empty() {
                    found.push((file.display().to_string(), words));
                }
            }
        }
        found
    }

    #[test]
    fn every_command_line_the_docs_show_parses() {
        let lines = documented_command_lines();
        assert!(lines.len() > 30, "{lines:?}");
        let refused: Vec<String> = lines
            .iter()
            .filter_map(|(file, words)| {
                let argv = std::iter::once("cargo xtask").chain(words.iter().map(String::as_str));
                super::Cli::try_parse_from(argv)
                    .err()
                    .map(|e| format!("{file}: cargo xtask {}: {}", words.join(" "), e.kind()))
            })
            .collect();
        assert!(refused.is_empty(), "{refused:#?}");
    }
}
