//! What the cluster's objects mean for a rollout: a pod ready, failed (and
//! why), unschedulable or stuck terminating; a Deployment rolled out or
//! stalled; and what a deployment runs, as `status` and `verify` show it.
//! The API's types are in `crate::kube` (`objects.rs`); this is the one
//! table of their meanings, tested on pod JSON.

use anyhow::Result;

use crate::kube::{
    Condition, Deployment, Kube, Pod, Probe, DEPLOYED_REVISION_ANNOTATION, DEPLOYED_TAG_ANNOTATION,
    DIRTY_ANNOTATION, REVISION_ANNOTATION, TAG_ANNOTATION,
};

/// What one deployment runs, as `status` and `verify` see it.
#[derive(Debug, serde::Serialize)]
pub struct Running {
    pub name: String,
    /// The image's own revision, stamped on the pod template by the deploy
    /// (none if not deployed by xtask): the last commit that changed its
    /// inputs.
    pub revision: Option<String>,
    /// The image's tag.
    pub tag: Option<String>,
    pub dirty: bool,
    /// The revision the last deploy was of (HEAD then) and its tag, from
    /// the Deployment's own metadata; none if deployed by an older xtask.
    pub deployed_revision: Option<String>,
    pub deployed_tag: Option<String>,
    /// The digest the pod template pins.
    pub digest: Option<String>,
    pub ready: usize,
    pub desired: i64,
    pub rolled_out: bool,
    /// Seconds since the oldest ready pod started.
    pub age_secs: Option<i64>,
    /// A ready pod that does not run the pinned digest.
    pub stale_pod: Option<String>,
    /// Containers and init containers the xtask did not build (sidecars,
    /// injected proxies, setup steps), `name (image)`: listed, never
    /// judged by its digests.
    pub other_containers: Vec<String>,
    /// Pods still there past their deletion time and grace period.
    pub stuck_pods: Vec<String>,
}

/// What a deployment runs, read from its pod template stamps and its
/// pods; `None` when it does not exist.
pub fn running(kube: &Kube, name: &str) -> Result<Option<Running>> {
    let Some(deployment) = kube.get::<Deployment>("deployment", name)? else {
        return Ok(None);
    };
    let digest = deployment.pinned_digest().map(str::to_owned);
    let pods = kube.pods(&deployment)?;
    let ready: Vec<&Pod> = pods.iter().filter(|p| p.is_ready()).collect();
    let stale = ready
        .iter()
        .find(|p| !digest.as_deref().is_some_and(|d| p.runs(name, d)))
        .map(|p| p.metadata.name.clone());
    let now = crate::time::now_epoch();
    let stuck_pods = stuck_terminating(&pods, now);
    let oldest_start = ready
        .iter()
        .filter_map(|p| p.status.start_time.as_deref())
        .filter_map(crate::time::parse_rfc3339)
        .min();
    Ok(Some(Running {
        name: name.to_owned(),
        revision: deployment.stamp(REVISION_ANNOTATION).map(str::to_owned),
        tag: deployment.stamp(TAG_ANNOTATION).map(str::to_owned),
        dirty: deployment.stamp(DIRTY_ANNOTATION) == Some("true"),
        deployed_revision: deployment
            .metadata
            .annotations
            .get(DEPLOYED_REVISION_ANNOTATION)
            .cloned(),
        deployed_tag: deployment
            .metadata
            .annotations
            .get(DEPLOYED_TAG_ANNOTATION)
            .cloned(),
        digest,
        ready: ready.len(),
        desired: deployment.spec.replicas,
        rolled_out: deployment.rolled_out(),
        age_secs: oldest_start.map(|t| crate::time::now_epoch() - t),
        stale_pod: stale,
        other_containers: deployment.spec.template.spec.others(name),
        stuck_pods,
    }))
}

impl Deployment {
    /// The rollout is complete: the controller saw this generation, every
    /// replica is updated and available, and no old replica remains.
    pub fn rolled_out(&self) -> bool {
        let s = &self.status;
        s.observed_generation >= self.metadata.generation
            && s.updated_replicas == self.spec.replicas
            && s.available_replicas == self.spec.replicas
            && s.replicas == self.spec.replicas
    }

    /// Why the controller says this rollout cannot finish, once it has seen
    /// the current generation (older conditions describe an older
    /// rollout): `ReplicaFailure` (pods cannot be created: a quota, a
    /// LimitRange, Pod Security or a webhook refused them) or `Progressing`
    /// false (`progressDeadlineSeconds` passed), with the API's message.
    /// When the apply changed the spec, a condition `before` (the
    /// Deployment as it was before the apply) already had, written at the
    /// same time, is the rollout this one replaces: a rollback's first
    /// polls still show the stall it undoes until the controller makes
    /// progress. An apply that changed nothing inherits the stall.
    pub fn stalled(&self, before: Option<&Deployment>) -> Option<Stalled> {
        if self.status.observed_generation < self.metadata.generation {
            return None;
        }
        let old = |c: &Condition| {
            !c.last_update_time.is_empty()
                && before.is_some_and(|before| {
                    before.metadata.generation < self.metadata.generation
                        && before.status.conditions.iter().any(|b| {
                            b.r#type == c.r#type
                                && b.status == c.status
                                && b.reason == c.reason
                                && b.last_update_time == c.last_update_time
                        })
                })
        };
        self.status
            .conditions
            .iter()
            .filter(|c| !old(c))
            .find_map(|c| {
                let replica_failure = c.r#type == "ReplicaFailure" && c.status == "True";
                let failed = replica_failure || (c.r#type == "Progressing" && c.status == "False");
                failed.then(|| Stalled {
                    message: format!("{} {}: {}", c.r#type, c.reason, c.message),
                    webhook_timeout: replica_failure && webhook_timed_out(&c.message),
                })
            })
    }
}

/// Why a rollout cannot finish, as its Deployment's conditions say.
#[derive(Debug, PartialEq)]
pub struct Stalled {
    /// `type reason: message`, the API's words.
    pub message: String,
    /// Pods could not be created because an admission webhook did not
    /// answer in time: the next try may pass, unlike a refusal (a quota,
    /// a LimitRange, Pod Security, a webhook that said no).
    pub webhook_timeout: bool,
}

/// Whether the API server's message says it could not reach a webhook in
/// time (`failed calling webhook "...": ... context deadline exceeded`,
/// or the HTTP client's timeout). The message is the only place the API
/// says so.
fn webhook_timed_out(message: &str) -> bool {
    message.contains("failed calling webhook")
        && ["deadline exceeded", "Client.Timeout", "i/o timeout"]
            .iter()
            .any(|t| message.contains(t))
}

/// Waiting reasons that will not fix themselves: fail at once.
const FATAL_WAITING: [&str; 8] = [
    "ImagePullBackOff",
    "ErrImagePull",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "InvalidImageName",
    "ErrImageNeverPull",
];

impl Pod {
    /// Ready and not terminating: a pod being deleted stays Ready through
    /// its `preStop` and grace period, but it is on its way out, so it
    /// neither proves nor disproves what a rollout runs.
    pub fn is_ready(&self) -> bool {
        self.metadata.deletion_timestamp.is_none()
            && !self.status.container_statuses.is_empty()
            && self.status.container_statuses.iter().all(|c| c.ready)
    }

    /// Whether `app`'s container reports `digest` as the image it runs
    /// (a sidecar's image is not ours to judge).
    pub fn runs(&self, app: &str, digest: &str) -> bool {
        let Some(ours) = self.spec.container_of(app) else {
            return false;
        };
        self.status
            .container_statuses
            .iter()
            .any(|c| c.name == ours.name && c.image_id.ends_with(digest))
    }

    /// Still there past its `deletionTimestamp` plus its grace period: a
    /// finalizer holds it, or its node stopped answering. It serves no
    /// longer, but it is worth a look.
    pub fn stuck_terminating(&self, now: i64) -> bool {
        let grace = self.spec.termination_grace_period_seconds.unwrap_or(30);
        self.metadata
            .deletion_timestamp
            .as_deref()
            .and_then(crate::time::parse_rfc3339)
            .is_some_and(|deleted| now > deleted + grace)
    }

    /// The scheduler's message while it cannot place this pod.
    pub fn unschedulable(&self) -> Option<&str> {
        self.status
            .conditions
            .iter()
            .find(|c| {
                c.r#type == "PodScheduled" && c.status == "False" && c.reason == "Unschedulable"
            })
            .map(|c| c.message.as_str())
    }

    /// Why this pod will not become ready: a state that will not fix itself
    /// (a fatal waiting reason, a failed init container, OOMKilled, any
    /// restart: a crash or a failing liveness probe), or unready past
    /// `grace_secs` since its containers started running (not since the
    /// pod started: that includes the image pull).
    ///
    /// A pod that existed before this rollout (`new` false: an older
    /// ReplicaSet's with the same digest, or an unchanged deployment's) is
    /// judged by its present state only: a restart or an OOM kill days ago
    /// is its history, not this rollout's failure.
    pub fn failure(&self, now: i64, grace_secs: i64, new: bool) -> Option<String> {
        // A pod being deleted (an older ReplicaSet's, even one that runs the
        // same digest) is on its way out: its containers exit on purpose.
        if self.metadata.deletion_timestamp.is_some() {
            return None;
        }
        for status in &self.status.init_container_statuses {
            let name = &status.name;
            if let Some(waiting) = &status.state.waiting {
                if FATAL_WAITING.contains(&waiting.reason.as_str()) {
                    return Some(format!("init container {name}: {}", waiting.reason));
                }
            }
            let states = if new {
                vec![&status.state, &status.last_state]
            } else {
                vec![&status.state]
            };
            for state in states {
                if let Some(failed) = state.terminated.as_ref().filter(|t| t.exit_code != 0) {
                    return Some(format!(
                        "init container {name} failed ({}, exit code {})",
                        failed.reason, failed.exit_code
                    ));
                }
            }
        }
        for status in &self.status.container_statuses {
            if let Some(waiting) = &status.state.waiting {
                if FATAL_WAITING.contains(&waiting.reason.as_str()) {
                    return Some(waiting.reason.clone());
                }
            }
            if !new {
                continue;
            }
            for state in [&status.state, &status.last_state] {
                if let Some(terminated) = &state.terminated {
                    if terminated.reason == "OOMKilled" {
                        return Some("OOMKilled".into());
                    }
                }
            }
            // A service's container never ends by itself: the first exit
            // is the crash, before the kubelet's back-off says so.
            if let Some(exited) = &status.state.terminated {
                return Some(format!(
                    "container {} exited ({}, exit code {})",
                    status.name, exited.reason, exited.exit_code
                ));
            }
            if status.restart_count > 0 {
                // A crash, or a liveness probe that failed (the pod's
                // events, which the failure message carries, say which).
                let last = status.last_state.terminated.as_ref();
                return Some(format!(
                    "container {} restarted {} time(s) (last exit: {}, code {})",
                    status.name,
                    status.restart_count,
                    last.map_or("?", |t| t.reason.as_str()),
                    last.map_or(0, |t| t.exit_code)
                ));
            }
        }
        // Each unready container gets the grace, or as long as the kubelet
        // itself would wait for its startup probe, whichever is longer.
        for status in self.status.container_statuses.iter().filter(|c| !c.ready) {
            let Some(started) = status
                .state
                .running
                .as_ref()
                .and_then(|r| r.started_at.as_deref())
                .and_then(crate::time::parse_rfc3339)
            else {
                continue;
            };
            let startup = self
                .spec
                .containers
                .iter()
                .find(|c| c.name == status.name)
                .and_then(|c| c.startup_probe.as_ref())
                .map(Probe::budget);
            let window = grace_secs.max(startup.unwrap_or(0));
            if now - started > window {
                return Some(match startup {
                    Some(budget) if budget >= grace_secs => format!(
                        "container {} not ready after its startup probe's {budget}s (initialDelaySeconds + failureThreshold × periodSeconds)",
                        status.name
                    ),
                    _ => format!("readiness still failing after {grace_secs}s"),
                });
            }
        }
        None
    }
}

/// The names of `pods` stuck terminating at `now` (see
/// [`Pod::stuck_terminating`]).
pub fn stuck_terminating(pods: &[Pod], now: i64) -> Vec<String> {
    pods.iter()
        .filter(|p| p.stuck_terminating(now))
        .map(|p| p.metadata.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn with_status(status: serde_json::Value) -> Pod {
        pod(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "r/aiq-agent@sha256:new"}]},
            "status": status,
        }))
    }

    #[test]
    fn fatal_states_are_named() {
        for reason in FATAL_WAITING {
            let p = with_status(
                serde_json::json!({"containerStatuses": [{"name": "c", "state": {"waiting": {"reason": reason}}}]}),
            );
            assert_eq!(p.failure(0, 30, true).as_deref(), Some(reason));
        }
        let oom = with_status(
            serde_json::json!({"containerStatuses": [{"name": "c", "state": {"running": {}}, "lastState": {"terminated": {"reason": "OOMKilled"}}}]}),
        );
        assert_eq!(oom.failure(0, 30, true).as_deref(), Some("OOMKilled"));
        let creating = with_status(
            serde_json::json!({"containerStatuses": [{"name": "c", "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
        );
        assert_eq!(creating.failure(0, 30, true), None);
        let init = with_status(
            serde_json::json!({"initContainerStatuses": [{"name": "migrate", "state": {"waiting": {"reason": "PodInitializing"}}, "lastState": {"terminated": {"reason": "Error", "exitCode": 4}}}], "containerStatuses": [{"name": "c", "state": {"waiting": {"reason": "PodInitializing"}}}]}),
        );
        assert_eq!(
            init.failure(0, 30, true).as_deref(),
            Some("init container migrate failed (Error, exit code 4)")
        );
        let restarted = with_status(
            serde_json::json!({"containerStatuses": [{"name": "c", "restartCount": 1, "state": {"running": {}}, "lastState": {"terminated": {"reason": "Error", "exitCode": 137}}}]}),
        );
        assert_eq!(
            restarted.failure(0, 30, true).as_deref(),
            Some("container c restarted 1 time(s) (last exit: Error, code 137)")
        );
    }

    #[test]
    fn a_container_that_exited_fails_before_any_back_off() {
        let p = with_status(
            serde_json::json!({"containerStatuses": [{"name": "c", "restartCount": 0, "state": {"terminated": {"reason": "Error", "exitCode": 3}}}]}),
        );
        assert_eq!(
            p.failure(0, 30, true).as_deref(),
            Some("container c exited (Error, exit code 3)")
        );
    }

    #[test]
    fn a_pod_from_before_the_rollout_is_judged_by_its_present_state() {
        let restarted_long_ago = with_status(
            serde_json::json!({"containerStatuses": [{"name": "c", "ready": true, "restartCount": 1, "state": {"running": {}}, "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}),
        );
        assert!(restarted_long_ago.failure(0, 30, true).is_some());
        assert_eq!(restarted_long_ago.failure(0, 30, false), None);
        let crash_looping = with_status(
            serde_json::json!({"containerStatuses": [{"name": "c", "restartCount": 9, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}),
        );
        assert_eq!(
            crash_looping.failure(0, 30, false).as_deref(),
            Some("CrashLoopBackOff")
        );
    }

    #[test]
    fn a_pod_being_deleted_is_not_a_failure_of_the_rollout() {
        let mut p = with_status(
            serde_json::json!({"containerStatuses": [{"name": "c", "state": {"terminated": {"reason": "Completed", "exitCode": 0}}}]}),
        );
        assert!(p.failure(0, 30, true).is_some());
        p.metadata.deletion_timestamp = Some("2026-11-24T22:00:00Z".into());
        assert_eq!(p.failure(0, 30, true), None);
    }

    #[test]
    fn unschedulable_pods_carry_the_schedulers_message() {
        let p = with_status(
            serde_json::json!({"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes are available: 1 Insufficient cpu."}]}),
        );
        assert_eq!(
            p.unschedulable(),
            Some("0/1 nodes are available: 1 Insufficient cpu.")
        );
        assert_eq!(
            p.failure(0, 30, true),
            None,
            "a budget of its own, in the wait"
        );
    }

    #[test]
    fn unready_past_the_grace_window_fails() {
        let start = "2026-11-23T20:00:00Z";
        let t0 = crate::time::parse_rfc3339(start).unwrap();
        let p = with_status(
            serde_json::json!({"startTime": "2026-11-23T19:59:00Z", "containerStatuses": [{"name": "c", "ready": false, "state": {"running": {"startedAt": start}}}]}),
        );
        assert_eq!(
            p.failure(t0 + 10, 30, true),
            None,
            "the minute the image took to pull does not count"
        );
        assert!(p.failure(t0 + 31, 30, true).unwrap().contains("readiness"));
        let pulling = with_status(
            serde_json::json!({"startTime": "2026-11-23T19:00:00Z", "containerStatuses": [{"name": "c", "ready": false, "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
        );
        assert_eq!(pulling.failure(t0, 30, true), None, "not running yet");
    }

    #[test]
    fn a_startup_probe_gets_the_time_the_kubelet_gives_it() {
        let start = "2026-11-23T20:00:00Z";
        let t0 = crate::time::parse_rfc3339(start).unwrap();
        let p = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "r/x@sha256:new",
                "startupProbe": {"initialDelaySeconds": 5, "periodSeconds": 2, "failureThreshold": 30}}]},
            "status": {"containerStatuses": [{"name": "c", "ready": false, "state": {"running": {"startedAt": start}}}]},
        }));
        assert_eq!(p.failure(t0 + 31, 30, true), None, "65 s of startup budget");
        assert_eq!(p.failure(t0 + 65, 30, true), None);
        assert!(p
            .failure(t0 + 66, 30, true)
            .unwrap()
            .contains("startup probe's 65s"));
        let defaults: Probe = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(
            defaults.budget(),
            30,
            "failureThreshold 3 × periodSeconds 10"
        );
    }

    #[test]
    fn digests_wanted_and_running() {
        let p = with_status(
            serde_json::json!({"containerStatuses": [{"name": "c", "ready": true, "imageID": "r/aiq-agent@sha256:new"}]}),
        );
        assert!(p.runs("aiq-agent", "sha256:new") && p.is_ready());
        assert!(!p.runs("aiq-agent", "sha256:old"));
    }

    #[test]
    fn the_apps_own_container_is_judged_and_sidecars_are_listed() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {
                "initContainers": [{"name": "setup", "image": "debian:bookworm-slim"}],
                "containers": [
                    {"name": "istio-proxy", "image": "proxy:1@sha256:other"},
                    {"name": "web", "image": "127.0.0.1:5000/team/aiq-agent@sha256:new"},
                ],
            },
            "status": {"containerStatuses": [
                {"name": "istio-proxy", "ready": true, "imageID": "proxy@sha256:other"},
                {"name": "web", "ready": true, "imageID": "127.0.0.1:5000/team/aiq-agent@sha256:new"},
            ]},
        }));
        assert_eq!(
            p.spec.container_of("aiq-agent").unwrap().name,
            "web",
            "by its image"
        );
        assert!(p.runs("aiq-agent", "sha256:new"), "the proxy is not judged");
        assert!(!p.runs("aiq-agent", "sha256:other"));
        assert!(
            !p.runs("aiq-frontend", "sha256:new"),
            "no container of that app"
        );
        assert_eq!(
            p.spec.others("aiq-agent"),
            [
                "setup (init, debian:bookworm-slim)",
                "istio-proxy (proxy:1@sha256:other)"
            ]
        );
    }

    #[test]
    fn a_pod_past_its_deletion_time_and_grace_is_stuck() {
        let deleted = "2026-11-24T22:00:00Z";
        let t = crate::time::parse_rfc3339(deleted).unwrap();
        let p = pod(serde_json::json!({
            "metadata": {"name": "p", "deletionTimestamp": deleted},
            "spec": {"containers": [], "terminationGracePeriodSeconds": 5},
        }));
        assert!(!p.stuck_terminating(t + 5));
        assert!(p.stuck_terminating(t + 6));
    }

    #[test]
    fn a_terminating_pod_is_not_counted_as_ready() {
        let mut p = with_status(
            serde_json::json!({"containerStatuses": [{"name": "c", "ready": true, "imageID": "r/aiq-agent@sha256:old"}]}),
        );
        assert!(p.is_ready());
        p.metadata.deletion_timestamp = Some("2026-11-24T22:00:00Z".into());
        assert!(!p.is_ready());
    }

    #[test]
    fn replica_failures_and_missed_deadlines_stall_the_rollout() {
        let deployment = |conditions: serde_json::Value, observed: i64| -> Deployment {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "d", "generation": 2},
                "spec": {"replicas": 1},
                "status": {"observedGeneration": observed, "conditions": conditions},
            }))
            .unwrap()
        };
        let quota = serde_json::json!([
            {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated", "message": "ok"},
            {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "pods \"d-1\" is forbidden: exceeded quota: q"},
        ]);
        assert_eq!(
            deployment(quota.clone(), 2).stalled(None),
            Some(Stalled {
                message:
                    "ReplicaFailure FailedCreate: pods \"d-1\" is forbidden: exceeded quota: q"
                        .into(),
                webhook_timeout: false,
            })
        );
        let webhook = serde_json::json!([
            {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "Internal error occurred: failed calling webhook \"slow.example.com\": failed to call webhook: Post \"https://127.0.0.1:9443/?timeout=1s\": context deadline exceeded"},
        ]);
        assert!(
            deployment(webhook, 2)
                .stalled(None)
                .unwrap()
                .webhook_timeout
        );
        let refused = serde_json::json!([
            {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "admission webhook \"deny.example.com\" denied the request: no"},
        ]);
        assert!(
            !deployment(refused, 2)
                .stalled(None)
                .unwrap()
                .webhook_timeout
        );
        assert_eq!(
            deployment(quota, 1).stalled(None),
            None,
            "an older rollout's condition"
        );
        let deadline = serde_json::json!([
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet \"d-1\" has timed out progressing."},
        ]);
        assert!(deployment(deadline, 2)
            .stalled(None)
            .unwrap()
            .message
            .starts_with("Progressing ProgressDeadlineExceeded"));
        let fine = serde_json::json!([{"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable", "message": "m"}]);
        assert_eq!(deployment(fine, 2).stalled(None), None);
        // A rollback's first polls: the stall it undoes, written before its
        // apply, is not its own; the same stall written again is.
        let timed_out = |at: &str| {
            serde_json::json!([
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "m", "lastUpdateTime": at},
            ])
        };
        let before = deployment(timed_out("2026-12-01T14:48:00Z"), 2);
        let undoing = deployment(timed_out("2026-12-01T14:48:00Z"), 3);
        let undoing = Deployment {
            metadata: serde_json::from_value(serde_json::json!({"name": "d", "generation": 3}))
                .unwrap(),
            ..undoing
        };
        assert_eq!(
            undoing.stalled(Some(&before)),
            None,
            "the undone rollout's stall"
        );
        assert!(undoing.stalled(None).is_some());
        let again = deployment(timed_out("2026-12-01T14:49:00Z"), 2);
        assert!(
            again.stalled(Some(&before)).is_some(),
            "a stall written after the apply"
        );
        let unchanged = deployment(timed_out("2026-12-01T14:48:00Z"), 2);
        assert!(
            unchanged.stalled(Some(&before)).is_some(),
            "an apply that changed nothing inherits the stall"
        );
    }

    #[test]
    fn rollout_complete_only_when_all_replicas_are_new_and_available() {
        let mut d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "d", "generation": 3},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}},
            "status": {"observedGeneration": 3, "replicas": 3, "updatedReplicas": 2, "readyReplicas": 3, "availableReplicas": 2}
        })).unwrap();
        assert!(!d.rolled_out(), "an old replica is still there");
        d.status.replicas = 2;
        assert!(d.rolled_out());
        d.status.observed_generation = 2;
        assert!(!d.rolled_out());
    }
}
