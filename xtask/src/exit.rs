//! Exit codes: the error type that picks a code other than 1 (refusals 2,
//! a failed rollback 3, an interrupt 130: see `cancel.rs`).

use std::fmt;

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
