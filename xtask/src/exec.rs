//! The one place processes are made (`tests/tidy.rs` checks it): commands
//! echoed, run, or (with `--dry-run`) only printed; `Cmd` and its shell
//! quoting; daemons and pipes; numbered and timed steps; finding tools.

use std::{cell::Cell, fmt, io::Write, process::Stdio, time::Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use xshell::Shell;

use crate::{cancel::Cancel, env::Env};
use crate::{
    exit::refuse,
    output::{Output, BOLD, GREEN, RED},
};

/// A command line as data, so it can be echoed with real shell quoting,
/// printed by `--dry-run`, and checked by tests.
#[derive(Clone, PartialEq, Eq)]
pub struct Cmd {
    argv: Vec<String>,
    stdin: Option<Vec<u8>>,
    /// Whether the echoed line shows what stdin gets (never for a secret).
    show_stdin: bool,
}

impl Cmd {
    pub fn new(program: impl Into<String>) -> Cmd {
        Cmd {
            argv: vec![program.into()],
            stdin: None,
            show_stdin: false,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Cmd {
        self.argv.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.argv.extend(args.into_iter().map(Into::into));
        self
    }

    /// Feeds bytes on stdin that the echoed line does not show: a secret
    /// (never in argv, the echo or any log), or data no one would read.
    pub fn hidden_stdin(mut self, bytes: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(bytes.into());
        self.show_stdin = false;
        self
    }

    /// Feeds `text` on stdin, shown in the echoed line as
    /// `printf '%s\n' '...' | cmd` so a dry run's line can be pasted.
    pub fn stdin(mut self, text: impl Into<String>) -> Cmd {
        self.stdin = Some(text.into().into_bytes());
        self.show_stdin = true;
        self
    }

    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    // The one place a process is made.
    #[allow(clippy::disallowed_methods)]
    fn to_xshell<'a>(&self, sh: &'a Shell) -> xshell::Cmd<'a> {
        let mut cmd = sh.cmd(&self.argv[0]).args(&self.argv[1..]).quiet();
        if let Some(stdin) = &self.stdin {
            cmd = cmd.stdin(stdin);
        }
        cmd
    }
}

/// Never shows what stdin gets: it may be a password (`{:?}` reaches error
/// messages and logs).
impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cmd")
            .field("argv", &self.argv)
            .field("stdin_bytes", &self.stdin.as_ref().map(Vec::len))
            .finish()
    }
}

/// The copy-pasteable form: every argument quoted for a POSIX shell, and
/// a shown stdin piped in.
impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(stdin), true) = (&self.stdin, self.show_stdin) {
            let text = String::from_utf8_lossy(stdin);
            write!(f, "printf '%s\\n' {} | ", shell_quote(&text))?;
        }
        let quoted: Vec<String> = self.argv.iter().map(|a| shell_quote(a)).collect();
        f.write_str(&quoted.join(" "))
    }
}

/// Quotes `word` so a POSIX shell reads it back unchanged.
pub fn shell_quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Runs commands for one xtask invocation. Commands that change state go
/// through [`Exec::run`]; read-only queries through [`Exec::read`], which runs
/// even in a dry run because the plan depends on their answers.
pub struct Exec<'a> {
    pub sh: &'a Shell,
    pub dry_run: bool,
    pub output: Output,
    /// The environment `main` read: the only one the xtask consults.
    pub env: Env,
    /// Set by an interrupt or a lost deploy lock; the deploy checks it.
    pub cancel: Cancel,
    step: Cell<usize>,
    /// Each finished step's name and seconds, for end-of-run summaries.
    timings: std::cell::RefCell<Vec<(String, f64)>>,
}

impl<'a> Exec<'a> {
    pub fn new(sh: &'a Shell, dry_run: bool, output: Output, env: Env, cancel: Cancel) -> Exec<'a> {
        Exec {
            sh,
            dry_run,
            output,
            env,
            cancel,
            step: Cell::new(0),
            timings: Default::default(),
        }
    }

    /// `PATH` as the commands run here see it: the process's, with what a
    /// `push_env` on the shell put first (the test cluster's binaries).
    #[allow(clippy::disallowed_methods)]
    pub fn path(&self) -> Option<std::ffi::OsString> {
        self.sh.var_os("PATH")
    }

    /// `cmd` about to run (echoed on stderr), or printed as the plan by a
    /// dry run (stdout).
    fn echo(&self, cmd: &Cmd, planned: bool) {
        self.output
            .command_line(cmd.argv(), &cmd.to_string(), planned);
    }

    /// Echoes `cmd` on stderr and runs it with its output on stderr (stdout
    /// stays for dry-run lines and machine output); in a dry run, prints it on
    /// stdout as `$ cmd` and runs nothing.
    pub fn run(&self, cmd: &Cmd) -> Result<()> {
        if self.dry_run {
            self.echo(cmd, true);
            return Ok(());
        }
        self.run_anyway(cmd)
    }

    /// Runs `cmd` even in a dry run: for the setup commands of tests and CI
    /// that only have a real mode.
    pub fn run_anyway(&self, cmd: &Cmd) -> Result<()> {
        self.echo(cmd, false);
        self.spawn(cmd)
    }

    /// Like [`Exec::run`], but `cmd`'s stderr goes to `follow` as it comes
    /// (which shows it, and reads what failed): for failures the caller
    /// must tell apart, such as a registry hiccup and a compile error.
    /// Returns whether `cmd` succeeded and what `follow` found; a dry run
    /// only prints the line.
    pub fn run_following<T: Default>(
        &self,
        cmd: &Cmd,
        follow: impl FnOnce(&mut dyn std::io::BufRead) -> T,
    ) -> Result<(bool, T)> {
        if self.dry_run {
            self.echo(cmd, true);
            return Ok((true, T::default()));
        }
        self.echo(cmd, false);
        let mut child = self.start(cmd, Stdio::piped())?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let found = follow(&mut std::io::BufReader::new(stderr));
        let status = child.wait()?;
        Ok((status.success(), found))
    }

    /// `from | into`, where `into` reads what `from` prints (a password):
    /// echoed as one line, with one `command` event; a dry run only prints
    /// it. What passes between them is never shown.
    pub fn pipe(&self, from: &Cmd, into: &Cmd) -> Result<()> {
        let argv = [from.argv(), &["|".to_owned()], into.argv()].concat();
        self.output
            .command_line(&argv, &format!("{from} | {into}"), self.dry_run);
        if self.dry_run {
            return Ok(());
        }
        let printed = self.read(from)?;
        self.spawn(&into.clone().hidden_stdin(printed))
    }

    /// Runs `cmd`, already echoed.
    fn spawn(&self, cmd: &Cmd) -> Result<()> {
        let status = self.start(cmd, Stdio::inherit())?.wait()?;
        if !status.success() {
            bail!("`{cmd}` failed ({status})");
        }
        Ok(())
    }

    /// Starts `cmd` with its stdout on our stderr (stdout is for results
    /// only) and its stdin fed.
    fn start(&self, cmd: &Cmd, stderr: Stdio) -> Result<std::process::Child> {
        let mut command: std::process::Command = cmd.to_xshell(self.sh).into();
        command
            .stdout(Stdio::from(std::io::stderr()))
            .stderr(stderr);
        if cmd.stdin.is_some() {
            command.stdin(Stdio::piped());
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("could not start `{}`", cmd.argv[0]))?;
        if let (Some(bytes), Some(mut stdin)) = (&cmd.stdin, child.stdin.take()) {
            stdin
                .write_all(bytes)
                .with_context(|| format!("feeding stdin to `{}`", cmd.argv[0]))?;
        }
        Ok(child)
    }

    /// Starts `cmd` in the background as a daemon: its own process group
    /// (a Ctrl-C to the xtask does not reach it), stdin closed, stdout and
    /// stderr appended to `log`. Echoed like any command; a dry run only
    /// prints it. Returns the pid (0 in a dry run).
    pub fn start_daemon(&self, cmd: &Cmd, log: &std::path::Path) -> Result<u32> {
        let line = format!("{cmd} >>{} 2>&1 &", shell_quote(&log.display().to_string()));
        self.output.command_line(&cmd.argv, &line, self.dry_run);
        if self.dry_run {
            return Ok(0);
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        use std::os::unix::process::CommandExt;
        let mut command: std::process::Command = cmd.to_xshell(self.sh).into();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0)
            .spawn()
            .with_context(|| format!("could not start `{}`", cmd.argv[0]))?;
        Ok(child.id())
    }

    /// Like [`Exec::run`], but returns the command's stdout (its stderr
    /// passes through): for writes whose answer matters, such as the object
    /// a `kubectl create --output json` made. A dry run prints the line and
    /// returns an empty string.
    pub fn run_capturing(&self, cmd: &Cmd) -> Result<String> {
        self.echo(cmd, self.dry_run);
        if self.dry_run {
            return Ok(String::new());
        }
        let output = self.capture(cmd)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprint!("{stderr}");
        if !output.status.success() {
            let reason = stderr.trim().lines().last().unwrap_or("no output");
            bail!("`{cmd}` failed ({}): {reason}", output.status);
        }
        String::from_utf8(output.stdout)
            .with_context(|| format!("`{cmd}` printed non-UTF-8 output"))
    }

    /// Runs a query, capturing its output whatever its exit status.
    fn capture(&self, cmd: &Cmd) -> Result<std::process::Output> {
        cmd.to_xshell(self.sh)
            .ignore_status()
            .output()
            .with_context(|| format!("could not start `{}`", cmd.argv[0]))
    }

    /// Runs a read-only query and returns its stdout, trimmed.
    pub fn read(&self, cmd: &Cmd) -> Result<String> {
        String::from_utf8(self.read_bytes(cmd)?)
            .map(|s| s.trim_end().to_owned())
            .with_context(|| format!("`{cmd}` printed non-UTF-8 output"))
    }

    /// Runs a query (or a transform with no side effect, such as `gzip
    /// -c`) and returns its stdout as it is.
    pub fn read_bytes(&self, cmd: &Cmd) -> Result<Vec<u8>> {
        let output = self.capture(cmd)?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let reason = stderr.trim().lines().last().unwrap_or("no output");
            bail!("`{cmd}` failed ({}): {reason}", output.status);
        }
        Ok(output.stdout)
    }

    /// Runs a query and returns stdout and stderr together, whatever its
    /// exit status: for logs, which docker writes to both.
    pub fn read_all(&self, cmd: &Cmd) -> Result<String> {
        let output = self.capture(cmd)?;
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        Ok(text)
    }

    /// Whether a query succeeds, for probes like "is this image present".
    pub fn succeeds(&self, cmd: &Cmd) -> bool {
        self.capture(cmd).is_ok_and(|o| o.status.success())
    }

    /// The steps finished so far: name and seconds.
    pub fn timings(&self) -> Vec<(String, f64)> {
        self.timings.borrow().clone()
    }

    /// Runs one numbered step of the work: announced, timed, and reported
    /// as done or failed (on stderr, and as events under `--json`).
    pub fn step<T>(&self, name: impl Into<String>, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let number = self.step.get() + 1;
        self.step.set(number);
        let name = name.into();
        let out = self.output;
        eprintln!("{}", out.paint(BOLD, &format!("[{number}] {name}")));
        out.event("step_started", json!({"step": number, "name": name}));
        let started = Instant::now();
        let result = work();
        let seconds = started.elapsed().as_secs_f64();
        let (outcome, colour) = match result {
            Ok(_) => ("done", GREEN),
            Err(_) => ("failed", RED),
        };
        let line = format!("[{number}] {name} {outcome} in {seconds:.1}s");
        self.timings.borrow_mut().push((name.clone(), seconds));
        eprintln!("{}", out.paint(colour, &line));
        out.event(
            "step_finished",
            json!({"step": number, "name": name, "outcome": outcome, "seconds": seconds}),
        );
        result
    }
}

/// This process's real user and group ids, as `uid:gid`.
pub fn user_and_group() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let id = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
    };
    Some(format!("{}:{}", id("Uid:")?, id("Gid:")?))
}

/// Whether this process runs as root (real uid 0).
pub fn is_root() -> bool {
    user_and_group().is_some_and(|ids| ids.starts_with("0:"))
}

/// Finds a tool on PATH, or refuses naming it and how to install it.
pub fn require_tool(name: &str, install_hint: &str) -> Result<std::path::PathBuf> {
    which::which(name).map_err(|_| refuse(format!("`{name}` not found on PATH: {install_hint}")))
}

#[cfg(test)]
// The tests read the quoting back with a real shell.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn quoting_round_trips_through_sh() {
        let words = [
            "plain",
            "with space",
            "it's",
            "",
            "$HOME",
            "a\"b",
            "x;rm -rf /",
            "tab\there",
        ];
        let cmd = Cmd::new("printf").arg("%s\\n").args(words);
        let line = cmd.to_string();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&line)
            .output()
            .unwrap();
        let printed = String::from_utf8(out.stdout).unwrap();
        let expected: String = words.iter().map(|w| format!("{w}\n")).collect();
        assert_eq!(printed, expected, "line was: {line}");
    }

    #[test]
    fn shown_stdin_is_piped_in_and_hidden_stdin_never_shows() {
        let lease = r#"{"kind": "Lease", "note": "it's"}"#;
        let cmd = Cmd::new("cat").stdin(lease);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd.to_string())
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{lease}\n"));
        let secret = Cmd::new("docker").arg("login").hidden_stdin("hunter2");
        assert_eq!(secret.to_string(), "docker login");
        assert!(!format!("{secret:?}").contains("hunter2"), "{secret:?}");
        assert!(!format!("{:?}", Cmd::new("cat").stdin("lease")).contains("lease"));
    }

    #[test]
    fn safe_words_stay_bare() {
        assert_eq!(shell_quote("--no-cache"), "--no-cache");
        assert_eq!(
            shell_quote("localhost:5000/aiq-agent:0123456789ab"),
            "localhost:5000/aiq-agent:0123456789ab"
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
