//! The deploy lock: a Lease in the namespace, created atomically, renewed
//! while the work runs, short-lived so a killed deploy frees it within a
//! minute.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use serde_json::json;

use crate::{
    exec::{refuse, Exec},
    history::who,
    kube::{Kube, LOCK_NAME},
    time::{micro_time, now_epoch},
};

/// How long a lock lives without renewal: a killed deploy frees the
/// namespace within a minute.
const LOCK_SECONDS: i64 = 60;
const RENEW_EVERY: Duration = Duration::from_secs(15);

/// The deploy lock: a Lease created atomically (create fails if it exists),
/// renewed while the deploy runs, and short-lived so a killed deploy frees
/// the namespace within a minute.
pub struct Lock {
    /// The renewing thread and its stop flag; none in a dry run.
    renewer: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

/// Why this run no longer holds its lock, once the renewer finds out.
static LOST: Mutex<Option<String>> = Mutex::new(None);

/// Fails once the lock was lost (taken over, deleted, or not renewed for
/// so long it may have expired): the namespace may belong to another
/// deploy now, so this one must stop touching it.
pub fn check_held() -> Result<()> {
    match LOST.lock().map(|lost| lost.clone()) {
        Ok(Some(why)) => bail!("lost the deploy lock: {why}"),
        _ => Ok(()),
    }
}

pub fn is_lost() -> bool {
    LOST.lock().is_ok_and(|lost| lost.is_some())
}

fn lose(why: String) {
    if let Ok(mut lost) = LOST.lock() {
        lost.get_or_insert(why);
    }
}

/// This run's identity in the lease: who, where, and which process, so two
/// deploys from one machine are told apart.
fn holder() -> String {
    format!("{} (pid {})", who(), std::process::id())
}

impl Lock {
    /// Runs `work` holding the namespace's lock (taken as a numbered step,
    /// after Ctrl-C is caught), and releases it whatever `work` returns.
    /// `work`'s error wins over a failed release.
    pub fn hold<T>(kube: &Kube, reachable: bool, work: impl FnOnce() -> Result<T>) -> Result<T> {
        crate::exec::catch_interrupts()?;
        let step = format!("lock namespace {}", kube.namespace);
        let lock = kube.exec.step(step, || Lock::take(kube, reachable))?;
        let outcome = work();
        let released = lock.release(kube);
        let value = outcome?;
        released?;
        Ok(value)
    }

    fn take(kube: &Kube, reachable: bool) -> Result<Lock> {
        let exec = kube.exec;
        // Unreachable is allowed only in a dry run, which then plans blind.
        if reachable
            && exec
                .read(&kube.global(&[
                    "get",
                    "namespace",
                    &kube.namespace,
                    "--ignore-not-found",
                    "--output",
                    "name",
                ]))?
                .is_empty()
        {
            exec.run(&kube.global(&["create", "namespace", &kube.namespace]))?;
        }
        let lease = lease_json(kube, &holder());
        let create = kube
            .cmd(&["create", "--filename", "-"])
            .stdin(lease.to_string());
        if exec.dry_run {
            exec.run(&create)?;
            return Ok(Lock { renewer: None });
        }
        if let Err(error) = exec.run(&create) {
            take_over_expired(kube, lease, error)?;
        }
        Ok(Lock {
            renewer: Some(start_renewing(kube)),
        })
    }

    /// Stops renewing and deletes the lease, unless it was lost: then it
    /// is someone else's.
    fn release(self, kube: &Kube) -> Result<()> {
        if let Some((stop, renewer)) = self.renewer {
            stop.store(true, Ordering::SeqCst);
            let _ = renewer.join();
        }
        if is_lost() {
            return Ok(());
        }
        kube.exec
            .run(&kube.cmd(&["delete", "lease", LOCK_NAME, "--ignore-not-found"]))
    }
}

/// After a failed create: refuses while the holder's lease is live, takes
/// an expired one over with `replace` on the resourceVersion just read, so
/// two deploys cannot both take it.
fn take_over_expired(
    kube: &Kube,
    mut lease: serde_json::Value,
    create: anyhow::Error,
) -> Result<()> {
    let Some(held) = kube.get::<serde_json::Value>("lease", LOCK_NAME)? else {
        return Err(create.context("taking the deploy lock"));
    };
    let spec = &held["spec"];
    let holder = spec["holderIdentity"].as_str().unwrap_or("unknown");
    let duration = spec["leaseDurationSeconds"]
        .as_i64()
        .unwrap_or(LOCK_SECONDS);
    if expires(spec) >= now_epoch() {
        return Err(refuse(format!(
            "another deploy holds the lock in namespace {}: {holder} since {} (renewed {}); wait for it, or if it died, the lock expires {duration}s after its last renewal",
            kube.namespace,
            spec["acquireTime"].as_str().unwrap_or("?"),
            spec["renewTime"].as_str().unwrap_or("?"),
        )));
    }
    lease["metadata"]["resourceVersion"] = held["metadata"]["resourceVersion"].clone();
    kube.exec.output.warn(&format!(
        "the lock held by {holder} expired; taking it over"
    ));
    kube.exec
        .run(
            &kube
                .cmd(&["replace", "--filename", "-"])
                .stdin(lease.to_string()),
        )
        .map_err(|e| refuse(format!("another deploy took the expired lock first: {e:#}")))
}

/// Renews the lease every RENEW_EVERY on a thread of its own (with its own
/// Shell: `Exec` is not `Send`) until the returned flag is set. Before each
/// renewal it checks the lease is still this run's; when it is not, or
/// renewals have failed so long that it may have expired, the lock is lost
/// and the deploy stops at its next check.
fn start_renewing(kube: &Kube) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let read = kube.cmd(&[
        "get",
        "lease",
        LOCK_NAME,
        "--ignore-not-found",
        "--output",
        "json",
    ]);
    let renew = kube.cmd(&["patch", "lease", LOCK_NAME, "--type", "merge", "--patch"]);
    let flag = stop.clone();
    let output = kube.exec.output;
    let ours = holder();
    let renewer = std::thread::spawn(move || {
        let Ok(sh) = xshell::Shell::new() else { return };
        let exec = Exec::new(&sh, false, output);
        let mut last_try = Instant::now();
        let mut last_renewal = Instant::now();
        while !flag.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            if last_try.elapsed() < RENEW_EVERY {
                continue;
            }
            last_try = Instant::now();
            let renewed = exec.read(&read).and_then(|json| {
                let lease: serde_json::Value = if json.trim().is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::from_str(&json)?
                };
                match lease["spec"]["holderIdentity"].as_str() {
                    None => lose("the lease was deleted".into()),
                    Some(holder) if holder != ours => lose(format!("{holder} holds it now")),
                    Some(_) => {
                        let now = micro_time(now_epoch());
                        let patch = json!({"spec": {"renewTime": now}}).to_string();
                        exec.read(&renew.clone().arg(patch))?;
                        last_renewal = Instant::now();
                    }
                }
                Ok(())
            });
            if let Err(e) = renewed {
                output.warn(&format!("renewing the deploy lock failed: {e:#}"));
            }
            let limit = Duration::from_secs(LOCK_SECONDS as u64) - RENEW_EVERY;
            if last_renewal.elapsed() > limit {
                lose(format!(
                    "not renewed for {}s, so it may have expired",
                    limit.as_secs()
                ));
            }
            if is_lost() {
                return;
            }
        }
    });
    (stop, renewer)
}

fn lease_json(kube: &Kube, holder: &str) -> serde_json::Value {
    let now = micro_time(now_epoch());
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": LOCK_NAME, "namespace": kube.namespace},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": LOCK_SECONDS,
            "acquireTime": now,
            "renewTime": now,
        },
    })
}

/// Who holds a live lock, if anyone: for `status`, and to tell a deploy
/// that is still running from one that was killed.
pub fn live_holder(kube: &Kube) -> Result<Option<String>> {
    let Some(held) = kube.get::<serde_json::Value>("lease", LOCK_NAME)? else {
        return Ok(None);
    };
    let spec = &held["spec"];
    if expires(spec) < now_epoch() {
        return Ok(None);
    }
    Ok(Some(format!(
        "{} since {}",
        spec["holderIdentity"].as_str().unwrap_or("unknown"),
        spec["acquireTime"].as_str().unwrap_or("?")
    )))
}

/// When a lease expires unless renewed: its last renewal plus its duration.
fn expires(spec: &serde_json::Value) -> i64 {
    let renewed = spec["renewTime"]
        .as_str()
        .and_then(crate::time::parse_rfc3339)
        .unwrap_or(0);
    renewed
        + spec["leaseDurationSeconds"]
            .as_i64()
            .unwrap_or(LOCK_SECONDS)
}
