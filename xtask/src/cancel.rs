//! Cancellation: one token, made in `main` and carried down inside `Exec`,
//! that the signal handler sets on Ctrl-C or SIGTERM and the deploy lock's
//! renewer sets when the lock is lost; the deploy checks it between steps
//! and at every poll. Passed, not global: what stops a run is visible in
//! what the run was given.

use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc, Mutex,
};

use anyhow::{bail, Context, Result};

use crate::exit::ExitCode;

#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<State>);

#[derive(Debug, Default)]
struct State {
    /// How many interrupts arrived since [`Cancel::catch_interrupts`].
    signals: AtomicU32,
    /// Why this run no longer holds its deploy lock, once the renewer
    /// finds out.
    lost: Mutex<Option<String>>,
}

impl Cancel {
    /// Turns Ctrl-C and SIGTERM (a cancelled CI job) into this token's
    /// interrupt, so the deploy can write "interrupted" into the history
    /// and release its lock before exiting 130. A second signal does not
    /// cut that short: a cancelled GitHub job sends SIGINT, SIGTERM about
    /// 7.5 s later and SIGKILL 2.5 s after that, and the record and the
    /// release must still happen. A third signal exits at once; the lock
    /// then expires by itself.
    pub fn catch_interrupts(&self) -> Result<()> {
        let state = self.0.clone();
        ctrlc::set_handler(move || match state.signals.fetch_add(1, Ordering::SeqCst) {
            0 => eprintln!("interrupted: recording it in the deploy history and releasing the lock"),
            1 => eprintln!("interrupted again: still recording it and releasing the lock (a third time to quit at once)"),
            _ => std::process::exit(130),
        })
        .context("installing the Ctrl-C handler")
    }

    /// Whether an interrupt arrived.
    pub fn interrupted(&self) -> bool {
        self.0.signals.load(Ordering::SeqCst) > 0
    }

    /// Fails with exit code 130 once an interrupt arrived.
    pub fn check_interrupted(&self) -> Result<()> {
        if self.interrupted() {
            return Err(anyhow::Error::new(ExitCode {
                code: 130,
                message: "interrupted".into(),
            }));
        }
        Ok(())
    }

    /// The deploy lock is lost (taken over, deleted, or not renewed for so
    /// long it may have expired), for `why`; the first reason stays.
    pub fn lose_lock(&self, why: String) {
        if let Ok(mut lost) = self.0.lost.lock() {
            lost.get_or_insert(why);
        }
    }

    pub fn lock_lost(&self) -> bool {
        self.0.lost.lock().is_ok_and(|lost| lost.is_some())
    }

    /// Fails once the run must stop touching the cluster: interrupted
    /// (exit 130), or its lock lost (the namespace may belong to another
    /// deploy now).
    pub fn check(&self) -> Result<()> {
        self.check_interrupted()?;
        match self.0.lost.lock().map(|lost| lost.clone()) {
            Ok(Some(why)) => bail!("lost the deploy lock: {why}"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_lock_stops_the_run_with_its_first_reason_and_clones_share_it() {
        let cancel = Cancel::default();
        let renewer = cancel.clone();
        assert!(cancel.check().is_ok() && !cancel.lock_lost());
        renewer.lose_lock("the lease was deleted".into());
        renewer.lose_lock("later".into());
        assert!(cancel.lock_lost());
        let error = cancel.check().unwrap_err().to_string();
        assert_eq!(error, "lost the deploy lock: the lease was deleted");
        assert_eq!(crate::exit::exit_code(&cancel.check().unwrap_err()), 1);
    }
}
