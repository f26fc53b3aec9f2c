//! The deploy lock: a Lease in the namespace, created atomically, renewed
//! while the work runs, short-lived so a killed deploy frees it within a
//! minute.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
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

impl Lock {
    pub fn take(kube: &Kube, reachable: bool) -> Result<Lock> {
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
        let lease = lease_json(kube, &who());
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

    pub fn release(self, kube: &Kube) -> Result<()> {
        if let Some((stop, renewer)) = self.renewer {
            stop.store(true, Ordering::SeqCst);
            let _ = renewer.join();
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
/// Shell: `Exec` is not `Send`) until the returned flag is set.
fn start_renewing(kube: &Kube) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let renew = kube.cmd(&["patch", "lease", LOCK_NAME, "--type", "merge", "--patch"]);
    let flag = stop.clone();
    let output = kube.exec.output;
    let renewer = std::thread::spawn(move || {
        let Ok(sh) = xshell::Shell::new() else { return };
        let exec = Exec::new(&sh, false, output);
        let mut last = Instant::now();
        while !flag.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            if last.elapsed() >= RENEW_EVERY {
                let patch = json!({"spec": {"renewTime": micro_time(now_epoch())}}).to_string();
                if let Err(e) = exec.read(&renew.clone().arg(patch)) {
                    output.warn(&format!("renewing the deploy lock failed: {e:#}"));
                }
                last = Instant::now();
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
