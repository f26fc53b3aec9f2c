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

use anyhow::{Context, Result};
use serde_json::json;

use crate::{
    exec::{Cmd, Exec},
    exit::refuse,
    history::who,
    kube::Kube,
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
    /// The lease's resourceVersion after this run's last write of it:
    /// release deletes the lease only if nobody has written it since.
    version: Arc<Mutex<String>>,
}

/// This run's identity in the lease: who, where, and which process, so two
/// deploys from one machine are told apart.
fn holder(env: &crate::env::Env) -> String {
    format!("{} (pid {})", who(env), std::process::id())
}

fn resource_version(json: &str) -> Result<String> {
    let lease: serde_json::Value = serde_json::from_str(json).context("parsing the lease")?;
    lease["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_owned)
        .context("the lease has no resourceVersion")
}

impl Lock {
    /// Runs `work` holding the namespace's lock (taken as a numbered step,
    /// after Ctrl-C is caught), and releases it whatever `work` returns (a
    /// release that fails only warns: the lease then expires).
    pub fn hold<T>(kube: &Kube, reachable: bool, work: impl FnOnce() -> Result<T>) -> Result<T> {
        kube.exec.cancel.catch_interrupts()?;
        let step = format!("lock namespace {}", kube.namespace);
        let lock = kube.exec.step(step, || Lock::take(kube, reachable))?;
        let outcome = work();
        lock.release(kube);
        outcome
    }

    fn take(kube: &Kube, reachable: bool) -> Result<Lock> {
        let exec = kube.exec;
        // Unreachable is allowed only in a dry run, which then plans blind.
        if reachable && exec.read(&kube.namespace_query())?.is_empty() {
            // Another app's deploy may create it at the same moment: what
            // matters is that it exists.
            if let Err(error) = exec.run(&kube.create_namespace()) {
                if exec.read(&kube.namespace_query())?.is_empty() {
                    return Err(error);
                }
            }
        }
        let create = create_command(kube);
        if exec.dry_run {
            exec.run(&create)?;
            return Ok(Lock {
                renewer: None,
                version: Default::default(),
            });
        }
        let written = match exec.run_capturing(&create) {
            Ok(written) => written,
            Err(error) => take_over_expired(kube, error)?,
        };
        let version = Arc::new(Mutex::new(resource_version(&written)?));
        Ok(Lock {
            renewer: Some(start_renewing(kube, version.clone())),
            version,
        })
    }

    /// Stops renewing and deletes the lease, only if it is still exactly
    /// what this run last wrote (a delete with a resourceVersion
    /// precondition): a lost or changed lease is someone else's now. A
    /// lease that cannot be deleted is left to expire, with a warning.
    fn release(self, kube: &Kube) {
        let Some((stop, renewer)) = self.renewer else {
            return;
        };
        stop.store(true, Ordering::SeqCst);
        let _ = renewer.join();
        if kube.exec.cancel.lock_lost() {
            return;
        }
        let version = self.version.lock().map(|v| v.clone()).unwrap_or_default();
        let delete = kube.lease_delete_at(&kube.lock_name, &version);
        if let Err(e) = kube.exec.run_capturing(&delete) {
            kube.exec.output.warn(&format!(
                "left the deploy lock as it is (it expires {LOCK_SECONDS}s after its last renewal): {e:#}"
            ));
        }
    }
}

/// After a failed create. A lease that looks live is refused at once, with
/// its holder. One that looks expired by this machine's clock (which may
/// be skewed from the holder's) is watched for its full duration on this
/// machine's monotonic clock, as client-go's leader election does: a live
/// holder renews it within that time (a new resourceVersion) and this run
/// is refused; unchanged, it is replaced on the resourceVersion read, so
/// two deploys cannot both take it. Returns the lease as written.
fn take_over_expired(kube: &Kube, create_error: anyhow::Error) -> Result<String> {
    let Some(held) = kube.get::<serde_json::Value>("lease", &kube.lock_name)? else {
        return Err(create_error.context("taking the deploy lock"));
    };
    let spec = &held["spec"];
    let held_by = spec["holderIdentity"]
        .as_str()
        .unwrap_or("unknown")
        .to_owned();
    let duration = spec["leaseDurationSeconds"]
        .as_i64()
        .unwrap_or(LOCK_SECONDS);
    let refuse_held = |how: &str| {
        refuse(format!(
            "another deploy holds the lock in namespace {}: {held_by} since {} ({how}); wait for it, or if it died, the lock expires {duration}s after its last renewal",
            kube.namespace,
            spec["acquireTime"].as_str().unwrap_or("?"),
        ))
    };
    if expires(spec) >= now_epoch() {
        let renewed = format!("renewed {}", spec["renewTime"].as_str().unwrap_or("?"));
        return Err(refuse_held(&renewed));
    }
    let version = held["metadata"]["resourceVersion"].clone();
    kube.exec.output.warn(&format!(
        "the lock held by {held_by} looks expired; watching it for {duration}s before taking it over"
    ));
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(duration.max(0) as u64) {
        kube.exec.cancel.check_interrupted()?;
        std::thread::sleep(Duration::from_secs(1));
        match kube.get::<serde_json::Value>("lease", &kube.lock_name)? {
            None => {
                return kube.exec.run_capturing(&create_command(kube)).map_err(|e| {
                    refuse(format!("another deploy took the freed lock first: {e:#}"))
                })
            }
            Some(now) if now["metadata"]["resourceVersion"] != version => {
                return Err(refuse_held("it was renewed while this deploy watched it"));
            }
            Some(_) => {}
        }
    }
    // Acquired and renewed now, not when this run first tried: the watch
    // took a lease duration.
    let mut lease = lease_json(kube, &holder(&kube.exec.env));
    lease["metadata"]["resourceVersion"] = version;
    kube.exec.output.warn(&format!(
        "the lock held by {held_by} expired; taking it over"
    ));
    kube.exec
        .run_capturing(&kube.lease_write("replace", &lease))
        .map_err(|e| refuse(format!("another deploy took the expired lock first: {e:#}")))
}

/// Renews the lease every RENEW_EVERY on a thread of its own (with its own
/// Shell: `Exec` is not `Send`) until the returned flag is set. Each
/// renewal is a JSON patch that first tests the holder is still this run,
/// so it can never overwrite another deploy's lease; a lease taken over or
/// deleted, or renewals failing so long that it may have expired, lose the
/// lock and the deploy stops at its next check. `version` follows each
/// write.
fn start_renewing(
    kube: &Kube,
    version: Arc<Mutex<String>>,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let read = kube.lease_get(&kube.lock_name);
    let renew = kube.lease_patch(&kube.lock_name);
    let flag = stop.clone();
    let output = kube.exec.output;
    let env = kube.exec.env.clone();
    let cancel = kube.exec.cancel.clone();
    let ours = holder(&env);
    let renewer = std::thread::spawn(move || {
        let Ok(sh) = xshell::Shell::new() else { return };
        let exec = Exec::new(&sh, false, output, env, cancel.clone());
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
                    None => cancel.lose_lock("the lease was deleted".into()),
                    Some(holder) if holder != ours => {
                        cancel.lose_lock(format!("{holder} holds it now"))
                    }
                    Some(_) => {
                        let patch = json!([
                            {"op": "test", "path": "/spec/holderIdentity", "value": ours},
                            {"op": "replace", "path": "/spec/renewTime", "value": micro_time(now_epoch())},
                        ]);
                        let written = exec.read(&renew.clone().arg(patch.to_string()))?;
                        if let Ok(mut v) = version.lock() {
                            *v = resource_version(&written)?;
                        }
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
                cancel.lose_lock(format!(
                    "not renewed for {}s, so it may have expired",
                    limit.as_secs()
                ));
            }
            if cancel.lock_lost() {
                return;
            }
        }
    });
    (stop, renewer)
}

/// Creates the lease for this run, acquired and renewed now.
fn create_command(kube: &Kube) -> Cmd {
    kube.lease_write("create", &lease_json(kube, &holder(&kube.exec.env)))
}

fn lease_json(kube: &Kube, holder: &str) -> serde_json::Value {
    let now = micro_time(now_epoch());
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": kube.lock_name, "namespace": kube.namespace},
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
    let Some(held) = kube.get::<serde_json::Value>("lease", &kube.lock_name)? else {
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
