//! Deployments a HorizontalPodAutoscaler scales: the deploy leaves their
//! `spec.replicas` to it, or every deploy would reset the count the
//! autoscaler chose. Leaving the field out of an apply whose manager owned
//! it alone would reset it to 1 just the same, so the field is first handed
//! over the way Kubernetes documents it (server-side apply, "transferring
//! ownership"): applied at its live value by another field manager, which
//! keeps it once the xtask lets go.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::{Kube, FIELD_MANAGER};
use crate::exec::Cmd;

/// The field manager that holds `spec.replicas` once the xtask lets go,
/// until the autoscaler writes it (its writes take the field).
pub const HANDOVER_MANAGER: &str = "handover-to-hpa";

/// An existing Deployment an autoscaler scales.
#[derive(Debug)]
pub struct Autoscaled {
    pub name: String,
    /// Its live count, to hand over first: the xtask's apply still owns
    /// the field.
    pub hand_over: Option<i64>,
}

impl Kube<'_> {
    /// The Deployments among `names` that an autoscaler in `manifests` or
    /// in the namespace targets and that exist already (a new one starts at
    /// its manifest's count; the autoscaler takes it from there).
    pub fn autoscaled(&self, manifests: &[Value], names: &[String]) -> Result<Vec<Autoscaled>> {
        let json = self.read(&["get", "horizontalpodautoscalers", "--output", "json"])?;
        let live: Value = serde_json::from_str(&json)
            .context("parsing `kubectl get horizontalpodautoscalers`")?;
        let live = live["items"].as_array().cloned().unwrap_or_default();
        let targets = scale_targets(manifests.iter().chain(&live));
        let mut autoscaled = Vec::new();
        for name in names.iter().filter(|n| targets.contains(n.as_str())) {
            if let Some(hand_over) = self.replicas_to_hand_over(name)? {
                autoscaled.push(Autoscaled {
                    name: name.clone(),
                    hand_over,
                });
            }
        }
        Ok(autoscaled)
    }

    /// For an existing Deployment `name`, its live replica count if the
    /// xtask's apply owns the field (`Some(None)` if it does not); `None`
    /// if it does not exist.
    fn replicas_to_hand_over(&self, name: &str) -> Result<Option<Option<i64>>> {
        let json = self.read(&[
            "get",
            "deployment",
            name,
            "--ignore-not-found",
            "--show-managed-fields",
            "--output",
            "json",
        ])?;
        if json.trim().is_empty() {
            return Ok(None);
        }
        let deployment: Value = serde_json::from_str(&json)
            .with_context(|| format!("parsing `kubectl get deployment {name}`"))?;
        Ok(Some(owns_replicas(&deployment).then(|| {
            deployment["spec"]["replicas"].as_i64().unwrap_or(1)
        })))
    }

    /// Hands `spec.replicas` of each autoscaled Deployment the xtask still
    /// owns to [`HANDOVER_MANAGER`], at its live value (so nothing
    /// changes). A conflict means the autoscaler wrote the field meanwhile
    /// and has it: nothing left to hand over.
    pub fn hand_over_replicas(&self, autoscaled: &[Autoscaled]) -> Result<()> {
        for scaled in autoscaled {
            let Some(replicas) = scaled.hand_over else {
                continue;
            };
            let handed = self.exec.run(&self.replicas_apply(&scaled.name, replicas));
            if let Err(error) = handed {
                if !matches!(self.replicas_to_hand_over(&scaled.name), Ok(Some(None))) {
                    return Err(error.context(format!(
                        "handing deployment/{}'s spec.replicas to its autoscaler",
                        scaled.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// `kubectl apply --server-side` of `spec.replicas` alone, as
    /// [`HANDOVER_MANAGER`].
    fn replicas_apply(&self, name: &str, replicas: i64) -> Cmd {
        let object = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"replicas": replicas},
        });
        self.cmd(&[
            "apply",
            "--server-side",
            "--field-manager",
            HANDOVER_MANAGER,
            "--request-timeout=30s",
            "--filename=-",
        ])
        .stdin(object.to_string())
    }
}

/// The names of the Deployments the autoscalers among `objects` target.
fn scale_targets<'a>(objects: impl Iterator<Item = &'a Value>) -> BTreeSet<&'a str> {
    objects
        .filter(|o| o["kind"] == "HorizontalPodAutoscaler")
        .map(|o| &o["spec"]["scaleTargetRef"])
        .filter(|target| target["kind"] == "Deployment")
        .filter_map(|target| target["name"].as_str())
        .collect()
}

/// Whether the xtask's apply owns `spec.replicas` of `deployment` (read
/// with its managed fields).
fn owns_replicas(deployment: &Value) -> bool {
    deployment["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|m| {
            m["manager"] == FIELD_MANAGER
                && m["operation"] == "Apply"
                && !m["fieldsV1"]["f:spec"]["f:replicas"].is_null()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autoscalers_target_deployments_and_the_apply_may_own_the_count() {
        let hpa = |kind: &str, name: &str| {
            json!({"kind": "HorizontalPodAutoscaler",
                   "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": kind, "name": name}}})
        };
        let objects = [
            hpa("Deployment", "web"),
            hpa("StatefulSet", "db"),
            json!({"kind": "Deployment", "metadata": {"name": "api"}}),
        ];
        assert_eq!(scale_targets(objects.iter()), BTreeSet::from(["web"]));
        let managed = |manager: &str, operation: &str| {
            json!({"metadata": {"managedFields": [{"manager": manager, "operation": operation,
                "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {}}}}]}})
        };
        assert!(owns_replicas(&managed("xtask", "Apply")));
        assert!(!owns_replicas(&managed(
            "kube-controller-manager",
            "Update"
        )));
        assert!(!owns_replicas(&managed(HANDOVER_MANAGER, "Apply")));
        assert!(!owns_replicas(&json!({"metadata": {}})));
    }
}
