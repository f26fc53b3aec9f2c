//! Exit codes: the error type that picks a code other than 1 (refusals 2,
//! a failed rollback 3, an interrupt 130), and the interrupt flag.

use std::fmt;

use anyhow::{Context, Result};

/// A failure whose exit code is not the default 1; `main` exits with the
/// code of the first one in an error's chain.
#[derive(Debug)]
pub struct ExitCode {
    pub code: u8,
    pub message: String,
}

impl fmt::Display for ExitCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitCode {}

/// A refusal before anything started (bad usage, configuration, a missing
/// tool, a dirty tree): exit code 2.
pub fn refuse(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(ExitCode {
        code: 2,
        message: message.into(),
    })
}

/// A deploy failed and so did its rollback, so the cluster is in neither the
/// old nor the new state: exit code 3.
pub fn rollback_failed(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(ExitCode {
        code: 3,
        message: message.into(),
    })
}

/// Set by the first Ctrl-C or SIGTERM once [`catch_interrupts`] ran.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// How many such signals arrived.
static SIGNALS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Turns Ctrl-C and SIGTERM (a cancelled CI job) into a flag the deploy
/// checks between steps and at every poll, so it can write "interrupted"
/// into the history and release its lock before exiting 130. A second
/// signal does not cut that short: a cancelled GitHub job sends SIGINT,
/// SIGTERM about 7.5 s later and SIGKILL 2.5 s after that, and the record
/// and the release must still happen. A third signal exits at once; the
/// lock then expires by itself.
pub fn catch_interrupts() -> Result<()> {
    ctrlc::set_handler(|| {
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        match SIGNALS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => eprintln!("interrupted: recording it in the deploy history and releasing the lock"),
            1 => eprintln!("interrupted again: still recording it and releasing the lock (a third time to quit at once)"),
            _ => std::process::exit(130),
        }
    })
    .context("installing the Ctrl-C handler")
}

/// Fails with exit code 130 once an interrupt arrived.
pub fn check_interrupted() -> Result<()> {
    if was_interrupted() {
        return Err(anyhow::Error::new(ExitCode {
            code: 130,
            message: "interrupted".into(),
        }));
    }
    Ok(())
}

/// Whether the work stopped because of an interrupt.
pub fn was_interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// The exit code an error calls for: its [`ExitCode`], else 1 (failed work).
pub fn exit_code(error: &anyhow::Error) -> u8 {
    error
        .chain()
        .find_map(|cause| cause.downcast_ref::<ExitCode>())
        .map_or(1, |e| e.code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_exit_2_and_failures_exit_1() {
        assert_eq!(exit_code(&refuse("no")), 2);
        assert_eq!(exit_code(&refuse("no").context("while building")), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("push failed")), 1);
        assert_eq!(exit_code(&rollback_failed("x")), 3);
    }
}
