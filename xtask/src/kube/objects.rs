//! The Kubernetes objects the deploy reads with `-o json` (deployments,
//! pods, their conditions and container states): the API's types. What
//! their states mean for a rollout is in `crate::health`.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub generation: i64,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
    /// Set once the pod is being deleted; it may stay Ready through its
    /// `preStop` and grace period, but it no longer serves for long.
    #[serde(default)]
    pub deletion_timestamp: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct OwnerReference {
    #[serde(default)]
    pub uid: String,
}

/// A ReplicaSet: which Deployment owns it, and its revision and
/// `pod-template-hash`.
#[derive(Debug, Deserialize)]
pub struct ReplicaSet {
    pub metadata: Metadata,
}

#[derive(Debug, Deserialize)]
pub struct Deployment {
    pub metadata: Metadata,
    pub spec: DeploymentSpec,
    #[serde(default)]
    pub status: DeploymentStatus,
}

#[derive(Debug, Deserialize)]
pub struct DeploymentSpec {
    #[serde(default = "one")]
    pub replicas: i64,
    #[serde(default)]
    pub selector: LabelSelector,
    #[serde(default)]
    pub template: PodTemplate,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct PodTemplate {
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: PodSpec,
}

fn one() -> i64 {
    1
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub containers: Vec<Container>,
    #[serde(default)]
    pub init_containers: Vec<Container>,
    #[serde(default)]
    pub termination_grace_period_seconds: Option<i64>,
}

impl PodSpec {
    /// The container that runs the image `app` is built as: the one named
    /// `app`, else the one whose image is `app`'s repository (the
    /// reference kustomize pinned). Sidecars are the others.
    pub fn container_of(&self, app: &str) -> Option<&Container> {
        self.containers.iter().find(|c| c.name == app).or_else(|| {
            self.containers
                .iter()
                .find(|c| repository_name(&c.image) == app)
        })
    }

    /// Every container and init container but `app`'s, `name (image)`.
    pub fn others(&self, app: &str) -> Vec<String> {
        let ours = self.container_of(app).map(|c| c.name.as_str());
        self.init_containers
            .iter()
            .map(|c| format!("{} (init, {})", c.name, c.image))
            .chain(
                self.containers
                    .iter()
                    .filter(|c| Some(c.name.as_str()) != ours)
                    .map(|c| format!("{} ({})", c.name, c.image)),
            )
            .collect()
    }
}

/// The last path segment of an image reference, without tag or digest:
/// `aiq-agent` for `127.0.0.1:5000/team/aiq-agent@sha256:...`.
fn repository_name(image: &str) -> &str {
    let path = image.split('@').next().unwrap_or(image);
    let name = path.rsplit('/').next().unwrap_or(path);
    name.split(':').next().unwrap_or(name)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub startup_probe: Option<Probe>,
}

/// The timing of a probe, with the API's defaults.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    #[serde(default)]
    pub initial_delay_seconds: i64,
    #[serde(default = "ten")]
    pub period_seconds: i64,
    #[serde(default = "three")]
    pub failure_threshold: i64,
}

impl Probe {
    /// How long the kubelet waits for a startup probe before it gives up:
    /// `initialDelaySeconds + failureThreshold × periodSeconds`.
    pub fn budget(&self) -> i64 {
        self.initial_delay_seconds + self.failure_threshold * self.period_seconds
    }
}

fn ten() -> i64 {
    10
}
fn three() -> i64 {
    3
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    #[serde(default)]
    pub observed_generation: i64,
    #[serde(default)]
    pub replicas: i64,
    #[serde(default)]
    pub updated_replicas: i64,
    #[serde(default)]
    pub ready_replicas: i64,
    #[serde(default)]
    pub available_replicas: i64,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

impl Deployment {
    /// The controller's revision number of the current template.
    pub fn revision(&self) -> Option<String> {
        self.metadata
            .annotations
            .get(super::CONTROLLER_REVISION)
            .cloned()
    }

    /// The digest the pod template pins for the app's own container
    /// (`name@sha256:...`), if it pins one.
    pub fn pinned_digest(&self) -> Option<&str> {
        let container = self.spec.template.spec.container_of(&self.metadata.name)?;
        container.image.split_once('@').map(|(_, digest)| digest)
    }

    /// An annotation the deploy stamped on the pod template.
    pub fn stamp(&self, key: &str) -> Option<&str> {
        self.spec
            .template
            .metadata
            .annotations
            .get(key)
            .map(String::as_str)
    }
}

/// A status condition of a Deployment, a pod or a node.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub r#type: String,
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// When the controller last wrote it (a Deployment's conditions).
    #[serde(default)]
    pub last_update_time: String,
}

#[derive(Debug, Deserialize)]
pub struct Pod {
    pub metadata: Metadata,
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    pub init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub start_time: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ready: bool,
    #[serde(default, rename = "imageID")]
    pub image_id: String,
    #[serde(default)]
    pub restart_count: i64,
    #[serde(default)]
    pub state: ContainerState,
    #[serde(default)]
    pub last_state: ContainerState,
}

#[derive(Debug, Default, Deserialize)]
pub struct ContainerState {
    pub waiting: Option<Reason>,
    pub running: Option<Started>,
    pub terminated: Option<Reason>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reason {
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub exit_code: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    pub started_at: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repository_is_named_by_its_last_path_segment() {
        assert_eq!(repository_name("r:5000/a/b:1.2@sha256:x"), "b");
    }
}
