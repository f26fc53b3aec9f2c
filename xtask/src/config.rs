//! `[workspace.metadata.xtask]` + environment + flags, merged into one
//! `Config`; flags beat the environment, which beats the file. Every
//! environment variable the xtask reads is read here (`tests/tidy.rs`
//! checks it).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap::Args;
use serde::Deserialize;

use crate::{
    exec::{Cmd, Exec},
    exit::refuse,
};

/// The table as written in the root `Cargo.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    registry: String,
    #[serde(default = "default_base_registry")]
    base_registry: String,
    #[serde(default = "default_true")]
    push_latest: bool,
    #[serde(default)]
    source: Option<String>,
    #[serde(default = "default_namespace")]
    namespace: String,
    /// The app's name, for its deploy lock and history when several apps
    /// share a namespace.
    #[serde(default)]
    app: Option<String>,
    #[serde(default = "default_manifests")]
    manifests: PathBuf,
    /// The kube context deploys expect (the wrong-cluster guard).
    #[serde(default)]
    context: Option<String>,
    /// Deployments in the order they roll out; the rest follow.
    #[serde(default)]
    rollout_order: Vec<String>,
    #[serde(default)]
    environments: BTreeMap<String, Environment>,
    /// BuildKit cache import/export for `--cache` builds, passed to buildx
    /// as is, e.g. `type=registry,ref=<registry>/cache:aiq`.
    #[serde(default)]
    cache_from: Vec<String>,
    #[serde(default)]
    cache_to: Vec<String>,
    /// How to log in to the registry before pushing or reading it; derived
    /// for an ECR registry when not given.
    #[serde(default)]
    registry_login: Option<RegistryLogin>,
    images: Vec<Image>,
    /// The stack `up` runs on local Docker.
    #[serde(default)]
    local: Option<LocalStack>,
    /// The BuildKit version every build runs on (the pinned builder).
    #[serde(default = "default_buildkit")]
    buildkit: String,
    /// The pinned builder's build cache is kept under this many GB.
    #[serde(default = "default_build_cache_gb")]
    build_cache_gb: u32,
}

/// `[workspace.metadata.xtask.local]`: the stack `up` runs.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LocalStack {
    pub backend: LocalService,
    pub frontend: LocalService,
    /// The frontend's variable for the backend's address, which `up` sets
    /// to the backend of the same revision.
    pub backend_url_env: String,
    /// Where the frontend answers the backend's `/version`: it must say
    /// the revision being started, so halves that differ never go live.
    pub backend_version_path: String,
}

/// One service of the local stack: its image and its port in the container.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LocalService {
    pub image: String,
    pub port: u16,
}

/// `registry_login = { username = "...", password_command = [...] }`: a
/// command that prints a short-lived password on stdout, fed to `docker
/// login --password-stdin`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryLogin {
    pub username: String,
    pub password_command: Vec<String>,
}

/// `[workspace.metadata.xtask.environments.NAME]`: what differs per
/// environment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Environment {
    registry: Option<String>,
    context: Option<String>,
    namespace: Option<String>,
    /// Values for seeded build args in this environment (build arg →
    /// value), so its images can be built ahead of the deploy.
    #[serde(default)]
    seed_args: BTreeMap<String, String>,
}

/// What kind of packages a lockfile pins, from its file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockfileKind {
    /// `Cargo.lock`: the store holds the `.crate` files, `crates/<name>-<version>.crate`.
    Cargo,
    /// `package-lock.json`: the store is an npm cache (`_cacache/`).
    Npm,
}

impl LockfileKind {
    pub fn of(lockfile: &Path) -> Option<LockfileKind> {
        match lockfile.file_name()?.to_str()? {
            "Cargo.lock" => Some(LockfileKind::Cargo),
            "package-lock.json" => Some(LockfileKind::Npm),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LockfileKind::Cargo => "cargo",
            LockfileKind::Npm => "npm",
        }
    }
}

fn default_base_registry() -> String {
    "docker.io/library".into()
}
/// BuildKit's version when the configuration names none: the pinned
/// builder's.
pub const DEFAULT_BUILDKIT: &str = "v0.34.2";

fn default_buildkit() -> String {
    DEFAULT_BUILDKIT.into()
}
/// The size each builder's cache is kept under unless `build_cache_gb`
/// says otherwise.
pub const DEFAULT_BUILD_CACHE_GB: u32 = 10;

fn default_build_cache_gb() -> u32 {
    DEFAULT_BUILD_CACHE_GB
}
fn default_true() -> bool {
    true
}
fn default_namespace() -> String {
    "default".into()
}
fn default_manifests() -> PathBuf {
    "k8s".into()
}

/// One image the repository builds.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub name: String,
    pub dockerfile: PathBuf,
    #[serde(default = "default_context")]
    pub context: PathBuf,
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// A build arg taken from a deployed Service's external address.
    #[serde(default)]
    pub seed: Option<Seed>,
    /// `Cargo.lock` or `package-lock.json`: its packages enter the build
    /// from a dependency store, as the `deps` build context.
    #[serde(default)]
    pub lockfile: Option<PathBuf>,
    /// The repository paths the build may read, besides its Dockerfile and
    /// lockfile (default: its context). Only these are exported, so a
    /// Dockerfile that reads anything else fails naming the path.
    #[serde(default)]
    pub inputs: Vec<PathBuf>,
}

impl Image {
    /// Every repository path the build may read: the declared inputs (or
    /// the context), the Dockerfile and the lockfile.
    pub fn input_paths(&self) -> Vec<PathBuf> {
        let mut paths = if self.inputs.is_empty() {
            vec![self.context.clone()]
        } else {
            self.inputs.clone()
        };
        paths.push(self.dockerfile.clone());
        paths.extend(self.lockfile.clone());
        paths
    }
}

/// The seed flow: `build_arg` is set from the LoadBalancer address of
/// `service` (a deployment that rolls out earlier, whose Service has its
/// name), so this image is built only after that Service is up.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    pub build_arg: String,
    pub service: String,
    /// The value, with `{address}` replaced by the hostname or IP.
    #[serde(default = "default_seed_template")]
    pub template: String,
}

fn default_seed_template() -> String {
    "http://{address}".into()
}

fn default_context() -> PathBuf {
    ".".into()
}

/// A relative, non-empty path with no `..`: what `git archive` can export.
fn inside_repository(path: &Path) -> bool {
    use std::path::Component;
    !path.as_os_str().is_empty()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Flags that override the file and the environment; shared by every
/// command that builds.
#[derive(Args, Clone, Debug, Default)]
pub struct Overrides {
    /// Registry to tag and push to, e.g. `ghcr.io/acme` [env: XTASK_REGISTRY]
    #[arg(long, value_name = "REGISTRY")]
    pub registry: Option<String>,
    /// Where base images come from, e.g. `127.0.0.1:5000/library` [env: XTASK_BASE_REGISTRY]
    #[arg(long, value_name = "REGISTRY")]
    pub base_registry: Option<String>,
    /// Do not tag or move `:latest`
    #[arg(long)]
    pub no_latest: bool,
    /// Environment from [workspace.metadata.xtask.environments], e.g. staging
    #[arg(long = "env", value_name = "NAME")]
    pub environment: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub root: PathBuf,
    pub registry: String,
    pub base_registry: String,
    pub push_latest: bool,
    pub source: Option<String>,
    pub namespace: String,
    /// Names the deploy lock and history (`xtask-deploy-lock-<app>`); none:
    /// the names every earlier version used.
    pub app: Option<String>,
    pub manifests: PathBuf,
    pub context: Option<String>,
    pub rollout_order: Vec<String>,
    pub environment: Option<String>,
    /// The environment's values for seeded build args.
    pub seed_args: BTreeMap<String, String>,
    pub cache_from: Vec<String>,
    pub cache_to: Vec<String>,
    pub registry_login: Option<RegistryLogin>,
    pub images: Vec<Image>,
    pub local: Option<LocalStack>,
    /// BuildKit's version, e.g. `v0.34.2`: the pinned builder's.
    pub buildkit: String,
    /// The most the pinned builder's build cache may hold, in GB.
    pub build_cache_gb: u32,
}

impl Config {
    /// A configuration for unit tests: one image, a ghcr.io registry.
    #[cfg(test)]
    pub fn example() -> Config {
        Config {
            root: "/repo".into(),
            registry: "ghcr.io/acme".into(),
            base_registry: "127.0.0.1:5000/library".into(),
            push_latest: true,
            source: None,
            namespace: "aiq-agent".into(),
            app: None,
            manifests: "k8s".into(),
            context: None,
            rollout_order: vec![],
            environment: None,
            seed_args: BTreeMap::new(),
            cache_from: vec![],
            cache_to: vec![],
            registry_login: None,
            images: vec![Image {
                name: "aiq-agent".into(),
                dockerfile: "backend/Dockerfile".into(),
                context: ".".into(),
                build_args: BTreeMap::from([("EXTRA".into(), "1".into())]),
                seed: None,
                lockfile: None,
                inputs: vec![],
            }],
            local: None,
            buildkit: "v0.34.2".into(),
            build_cache_gb: DEFAULT_BUILD_CACHE_GB,
        }
    }

    /// The `Cargo.toml` of each image's own Cargo workspace (one whose
    /// lockfile is a `Cargo.lock` outside the repository root's workspace),
    /// relative to the root: what fmt, clippy and the tests cover beside the
    /// root's.
    pub fn image_workspaces(&self) -> Vec<PathBuf> {
        let mut manifests = Vec::new();
        for image in &self.images {
            let Some(lockfile) = &image.lockfile else {
                continue;
            };
            let manifest = lockfile.with_file_name("Cargo.toml");
            let own = lockfile
                .parent()
                .is_some_and(|dir| !dir.as_os_str().is_empty());
            if LockfileKind::of(lockfile) == Some(LockfileKind::Cargo)
                && own
                && !manifests.contains(&manifest)
            {
                manifests.push(manifest);
            }
        }
        manifests
    }

    /// Where generated files live: inside `target/`, so they never dirty
    /// the tree.
    pub fn out_dir(&self) -> PathBuf {
        self.root.join("target").join("xtask")
    }

    /// Reads the workspace's metadata through `cargo metadata` (run from the
    /// current directory, so any directory inside the workspace works).
    pub fn load(exec: &Exec, overrides: &Overrides) -> Result<Config> {
        let cargo = exec.env.cargo();
        let json = exec
            .read(&Cmd::new(cargo).args(["metadata", "--format-version", "1", "--no-deps"]))
            .map_err(|e| refuse(format!("cannot read the workspace metadata: {e:#}")))?;
        Config::from_cargo_metadata(&json, |key| exec.env.var(key), overrides)
    }

    fn from_cargo_metadata(
        json: &str,
        env: impl Fn(&str) -> Option<String>,
        overrides: &Overrides,
    ) -> Result<Config> {
        #[derive(Deserialize)]
        struct CargoMetadata {
            workspace_root: PathBuf,
            metadata: Option<serde_json::Value>,
        }
        let cargo: CargoMetadata =
            serde_json::from_str(json).context("parsing `cargo metadata` output")?;
        let table = cargo
            .metadata
            .and_then(|m| m.get("xtask").cloned())
            .ok_or_else(|| refuse("Cargo.toml has no [workspace.metadata.xtask] table"))?;
        let mut file: Metadata = serde_json::from_value(table)
            .map_err(|e| refuse(format!("invalid [workspace.metadata.xtask]: {e}")))?;
        let mut seed_args = BTreeMap::new();
        // An environment's own registry is where its cluster pulls from: an
        // ambient XTASK_REGISTRY must not send its images elsewhere.
        let mut environment_registry = None;
        if let Some(name) = &overrides.environment {
            let environment = file.environments.remove(name).ok_or_else(|| {
                let known: Vec<&str> = file.environments.keys().map(String::as_str).collect();
                refuse(format!(
                    "unknown environment {name:?}; configured: {}",
                    known.join(", ")
                ))
            })?;
            environment_registry = environment.registry.clone();
            file.registry = environment.registry.unwrap_or(file.registry);
            file.context = environment.context.or(file.context);
            file.namespace = environment.namespace.unwrap_or(file.namespace);
            seed_args = environment.seed_args;
        }
        let ambient = env("XTASK_REGISTRY");
        if let (None, Some(own), Some(ambient)) =
            (&overrides.registry, &environment_registry, &ambient)
        {
            if own != ambient {
                return Err(refuse(format!(
                    "XTASK_REGISTRY={ambient} conflicts with environment {}'s registry {own}: unset it, or pass --registry to choose on purpose",
                    overrides.environment.as_deref().unwrap_or_default()
                )));
            }
        }
        let config = Config {
            root: cargo.workspace_root,
            registry: overrides
                .registry
                .clone()
                .or(ambient)
                .unwrap_or(file.registry),
            base_registry: overrides
                .base_registry
                .clone()
                .or_else(|| env("XTASK_BASE_REGISTRY"))
                .unwrap_or(file.base_registry),
            push_latest: file.push_latest && !overrides.no_latest,
            source: file.source,
            namespace: file.namespace,
            app: file.app,
            manifests: file.manifests,
            context: file.context,
            rollout_order: file.rollout_order,
            environment: overrides.environment.clone(),
            seed_args,
            cache_from: file.cache_from,
            cache_to: file.cache_to,
            registry_login: file.registry_login,
            images: file.images,
            local: file.local,
            buildkit: file.buildkit,
            build_cache_gb: file.build_cache_gb,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if let Some(app) = &self.app {
            // It ends two object names of at most 63 characters.
            let label = !app.is_empty()
                && app.len() <= 40
                && app
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !app.starts_with('-')
                && !app.ends_with('-');
            if !label {
                return Err(refuse(format!(
                    "[workspace.metadata.xtask] app {app:?} must be lowercase letters, digits and '-', at most 40 characters"
                )));
            }
        }
        let version_ok = self.buildkit.strip_prefix('v').is_some_and(|v| {
            v.split('.').count() == 3
                && v.split('.')
                    .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
        if !version_ok {
            return Err(refuse(format!(
                "[workspace.metadata.xtask] buildkit {:?} must be a BuildKit release such as \"v0.34.2\"",
                self.buildkit
            )));
        }
        if self.build_cache_gb == 0 {
            return Err(refuse(
                "[workspace.metadata.xtask] build_cache_gb must be at least 1",
            ));
        }
        check_registry("registry", &self.registry)?;
        check_registry("base_registry", &self.base_registry)?;
        if self.images.is_empty() {
            return Err(refuse(
                "[workspace.metadata.xtask] images: at least one image is required",
            ));
        }
        for image in &self.images {
            // It names a directory of the export too: never `.` or `..`.
            let valid = image
                .name
                .starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && image
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
            if !valid {
                return Err(refuse(format!(
                    "[workspace.metadata.xtask] images: name {:?} must start with a lowercase letter or digit and hold only those, '-', '_' or '.'",
                    image.name
                )));
            }
            let paths = image
                .input_paths()
                .into_iter()
                .chain([image.context.clone()]);
            if let Some(path) = paths.into_iter().find(|p| !inside_repository(p)) {
                return Err(refuse(format!(
                    "[workspace.metadata.xtask] images: {}'s path {:?} must be relative to the repository root, not empty, and stay inside it",
                    image.name,
                    path.display().to_string()
                )));
            }
            if let Some(lockfile) = &image.lockfile {
                if LockfileKind::of(lockfile).is_none() {
                    return Err(refuse(format!(
                        "[workspace.metadata.xtask] images: {}'s lockfile {} must be a Cargo.lock or a package-lock.json",
                        image.name,
                        lockfile.display()
                    )));
                }
            }
        }
        let known: Vec<&str> = self.images.iter().map(|i| i.name.as_str()).collect();
        // A name here that no image has would fail only after the build
        // and the first apply.
        if let Some(unknown) = self
            .rollout_order
            .iter()
            .find(|name| !known.contains(&name.as_str()))
        {
            return Err(refuse(format!(
                "[workspace.metadata.xtask] rollout_order names {unknown:?}, which is not a configured image ({})",
                known.join(", ")
            )));
        }
        if let Some(local) = &self.local {
            for service in [&local.backend, &local.frontend] {
                if !known.contains(&service.image.as_str()) {
                    return Err(refuse(format!(
                        "[workspace.metadata.xtask.local] names {:?}, which is not a configured image ({})",
                        service.image,
                        known.join(", ")
                    )));
                }
            }
        }
        let order = self.rollout();
        let position = |name: &str| order.iter().position(|n| n == name);
        for image in &self.images {
            if let Some(seed) = &image.seed {
                let earlier = matches!(
                    (position(&seed.service), position(&image.name)),
                    (Some(service), Some(own)) if service < own
                );
                if !earlier {
                    return Err(refuse(format!(
                        "[workspace.metadata.xtask] images: {}'s seed service {:?} must be a deployment that rolls out before it (rollout_order)",
                        image.name, seed.service
                    )));
                }
            }
        }
        Ok(())
    }

    /// The value configured for `image`'s seeded build arg in the selected
    /// environment, if it has a seed and a value is given.
    pub fn seed_value(&self, image: &Image) -> Option<&String> {
        self.seed_args.get(&image.seed.as_ref()?.build_arg)
    }

    /// `images` with the environment's seed values set as build args; a
    /// seeded image without a value keeps its Dockerfile default, and is
    /// reported so.
    pub fn with_seed_values(&self, images: Vec<Image>, out: &crate::output::Output) -> Vec<Image> {
        images
            .into_iter()
            .map(|mut image| {
                if let Some(seed) = &image.seed {
                    match self.seed_value(&image) {
                        Some(value) => {
                            image.build_args.insert(seed.build_arg.clone(), value.clone());
                        }
                        None => out.warn(&format!(
                            "{} is built without {}: it comes from service {}'s address at deploy time, and no value is configured for this environment (seed_args)",
                            image.name, seed.build_arg, seed.service
                        )),
                    }
                }
                image
            })
            .collect()
    }

    /// The images named on the command line, in the order given; all of them
    /// when none is named.
    pub fn select_images(&self, names: &[String]) -> Result<Vec<Image>> {
        if names.is_empty() {
            return Ok(self.images.clone());
        }
        names
            .iter()
            .map(|name| {
                self.images
                    .iter()
                    .find(|i| &i.name == name)
                    .cloned()
                    .ok_or_else(|| {
                        let known: Vec<&str> =
                            self.images.iter().map(|i| i.name.as_str()).collect();
                        refuse(format!(
                            "unknown image {name:?}; known images: {}",
                            known.join(", ")
                        ))
                    })
            })
            .collect()
    }

    /// Deployment names in rollout order: the configured order first, then
    /// the other images as configured.
    pub fn rollout(&self) -> Vec<String> {
        let mut order: Vec<String> = self.rollout_order.clone();
        for image in &self.images {
            if !order.contains(&image.name) {
                order.push(image.name.clone());
            }
        }
        order
    }

    /// `<registry>/<image>:<tag>`.
    pub fn image_ref(&self, image: &str, tag: &str) -> String {
        format!("{}/{image}:{tag}", self.registry)
    }
}

fn check_registry(key: &str, value: &str) -> Result<()> {
    let bad = value.is_empty()
        || value.ends_with('/')
        || value.contains("://")
        || value
            .chars()
            .any(|c| c.is_whitespace() || c.is_ascii_uppercase());
    if bad {
        return Err(refuse(format!(
            "{key} {value:?} is not a registry reference (expected host[:port][/path], e.g. localhost:5000 or ghcr.io/acme)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const METADATA: &str = r#"{
        "workspace_root": "/repo",
        "metadata": {"xtask": {
            "registry": "ghcr.io/acme",
            "images": [{"name": "aiq-agent", "dockerfile": "backend/Dockerfile"}]
        }}
    }"#;

    fn load(json: &str, env: &[(&str, &str)], overrides: Overrides) -> Result<Config> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_cargo_metadata(json, |k| env.get(k).cloned(), &overrides)
    }

    #[test]
    fn an_image_reads_its_inputs_its_dockerfile_and_its_lockfile() {
        let config = load(METADATA, &[], Overrides::default()).unwrap();
        assert_eq!(
            config.images[0].input_paths(),
            [PathBuf::from("."), "backend/Dockerfile".into()],
            "no inputs declared: the context"
        );
        let declared = METADATA.replace(
            r#""dockerfile": "backend/Dockerfile"}"#,
            r#""dockerfile": "backend/Dockerfile", "context": "backend", "lockfile": "backend/Cargo.lock", "inputs": ["backend", "shared/proto"]}, {"name": "web", "dockerfile": "web/Dockerfile", "lockfile": "web/package-lock.json"}"#,
        );
        let config = load(&declared, &[], Overrides::default()).unwrap();
        assert_eq!(
            config.images[0].input_paths(),
            [
                PathBuf::from("backend"),
                "shared/proto".into(),
                "backend/Dockerfile".into(),
                "backend/Cargo.lock".into()
            ]
        );
        assert_eq!(
            config.image_workspaces(),
            [PathBuf::from("backend/Cargo.toml")]
        );
        for outside in ["../secrets", "/etc", ""] {
            let escaping = METADATA.replace(
                r#""dockerfile": "backend/Dockerfile"}"#,
                &format!(r#""dockerfile": "backend/Dockerfile", "inputs": ["{outside}"]}}"#),
            );
            let error = load(&escaping, &[], Overrides::default()).unwrap_err();
            assert!(
                error.to_string().contains(&format!(
                    "aiq-agent's path {outside:?} must be relative to the repository root"
                )),
                "{error}"
            );
        }
    }

    #[test]
    fn file_then_env_then_flags() {
        let config = load(METADATA, &[], Overrides::default()).unwrap();
        assert_eq!(config.registry, "ghcr.io/acme");
        assert_eq!(config.base_registry, "docker.io/library");
        assert_eq!(config.images[0].context, PathBuf::from("."));
        assert!(config.push_latest);

        let env = [
            ("XTASK_REGISTRY", "localhost:5000"),
            ("XTASK_BASE_REGISTRY", "127.0.0.1:5000/library"),
        ];
        let config = load(METADATA, &env, Overrides::default()).unwrap();
        assert_eq!(config.registry, "localhost:5000");
        assert_eq!(config.base_registry, "127.0.0.1:5000/library");

        let flags = Overrides {
            registry: Some("example.com/team".into()),
            no_latest: true,
            ..Overrides::default()
        };
        let config = load(METADATA, &env, flags).unwrap();
        assert_eq!(config.registry, "example.com/team");
        assert!(!config.push_latest);
        assert_eq!(
            config.image_ref("aiq-agent", "abc"),
            "example.com/team/aiq-agent:abc"
        );
    }

    #[test]
    fn environments_override_the_defaults() {
        let json = METADATA.replace(
            "\"images\"",
            r#""context": "dev", "environments": {"prod": {"registry": "1.dkr.ecr.eu-west-1.amazonaws.com", "context": "eks-prod", "namespace": "aiq-prod"}}, "images""#,
        );
        let prod = Overrides {
            environment: Some("prod".into()),
            ..Overrides::default()
        };
        let config = load(&json, &[], prod).unwrap();
        assert_eq!(config.registry, "1.dkr.ecr.eu-west-1.amazonaws.com");
        assert_eq!(config.context.as_deref(), Some("eks-prod"));
        assert_eq!(config.namespace, "aiq-prod");
        // An ambient XTASK_REGISTRY never silently beats prod's own.
        let ambient = [("XTASK_REGISTRY", "localhost:5000")];
        let err = load(
            &json,
            &ambient,
            Overrides {
                environment: Some("prod".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err();
        assert_eq!(crate::exit::exit_code(&err), 2);
        assert!(
            err.to_string().contains(
                "conflicts with environment prod's registry 1.dkr.ecr.eu-west-1.amazonaws.com"
            ),
            "{err}"
        );
        let chosen = Overrides {
            environment: Some("prod".into()),
            registry: Some("example.com/x".into()),
            ..Overrides::default()
        };
        assert_eq!(
            load(&json, &ambient, chosen).unwrap().registry,
            "example.com/x"
        );
        let config = load(&json, &[], Overrides::default()).unwrap();
        assert_eq!(config.context.as_deref(), Some("dev"));
        let unknown = Overrides {
            environment: Some("qa".into()),
            ..Overrides::default()
        };
        let err = load(&json, &[], unknown).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown environment \"qa\"; configured: prod"
        );
    }

    #[test]
    fn malformed_metadata_names_the_key() {
        let typo = METADATA.replace("\"registry\"", "\"registy\"");
        let err = load(&typo, &[], Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("registy"), "{err}");
        assert_eq!(crate::exit::exit_code(&err), 2);

        let bad_registry = [("XTASK_REGISTRY", "https://x/")];
        let err = load(METADATA, &bad_registry, Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("https://x/"), "{err}");
    }

    #[test]
    fn an_app_name_must_fit_an_object_name() {
        let with_app =
            |app: &str| METADATA.replace("\"images\"", &format!("\"app\": \"{app}\", \"images\""));
        assert_eq!(
            load(&with_app("billing"), &[], Overrides::default())
                .unwrap()
                .app
                .as_deref(),
            Some("billing")
        );
        let err = load(&with_app("Billing_App"), &[], Overrides::default()).unwrap_err();
        assert_eq!(crate::exit::exit_code(&err), 2);
        assert!(
            err.to_string().contains("app \"Billing_App\" must be"),
            "{err}"
        );
        assert_eq!(load(METADATA, &[], Overrides::default()).unwrap().app, None);
    }

    #[test]
    fn a_rollout_order_naming_no_image_is_refused_at_load() {
        let json = METADATA.replace(
            "\"images\"",
            "\"rollout_order\": [\"aiq-agent\", \"aiq-fronted\"], \"images\"",
        );
        let err = load(&json, &[], Overrides::default()).unwrap_err();
        assert_eq!(crate::exit::exit_code(&err), 2);
        assert!(
            format!("{err}").contains("rollout_order names \"aiq-fronted\""),
            "{err}"
        );
    }

    #[test]
    fn the_local_stack_comes_from_the_file_and_names_configured_images() {
        let stack = |backend: &str| {
            METADATA.replace(
                "\"images\"",
                &format!("\"local\": {{\"backend\": {{\"image\": \"{backend}\", \"port\": 8000}}, \"frontend\": {{\"image\": \"aiq-agent\", \"port\": 3000}}, \"backend_url_env\": \"API\", \"backend_version_path\": \"/api/version\"}}, \"images\""),
            )
        };
        let config = load(&stack("aiq-agent"), &[], Overrides::default()).unwrap();
        let local = config.local.unwrap();
        assert_eq!((local.backend.port, local.frontend.port), (8000, 3000));
        assert_eq!(local.backend_url_env, "API");
        assert_eq!(local.backend_version_path, "/api/version");
        let err = load(&stack("aiq-backend"), &[], Overrides::default()).unwrap_err();
        assert_eq!(crate::exit::exit_code(&err), 2);
        assert!(
            format!("{err}").contains("[workspace.metadata.xtask.local] names \"aiq-backend\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_image_is_refused_with_the_known_ones() {
        let config = load(METADATA, &[], Overrides::default()).unwrap();
        let err = config.select_images(&["nope".into()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown image \"nope\"; known images: aiq-agent"
        );
        assert_eq!(config.select_images(&[]).unwrap().len(), 1);
    }

    /// The fields `T` accepts, as serde lists them when it refuses an
    /// unknown one (every table is `deny_unknown_fields`).
    fn fields_of<T: serde::de::DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
        let refused = serde_json::from_value::<T>(serde_json::json!({ "?": 0 }))
            .unwrap_err()
            .to_string();
        let expected = refused.split("expected").nth(1).unwrap_or_default();
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    /// Every key of the schema is in `docs/configuration.md`'s table, and
    /// every key the table names is one the schema reads.
    #[test]
    fn every_configuration_key_is_documented_and_every_documented_key_exists() {
        let nested = |prefix: &str, fields: Vec<String>| -> Vec<String> {
            fields.into_iter().map(|f| format!("{prefix}{f}")).collect()
        };
        let containers = ["environments", "registry_login", "images", "local"];
        let mut schema: BTreeSet<String> = fields_of::<Metadata>()
            .into_iter()
            .filter(|f| !containers.contains(&f.as_str()))
            .collect();
        schema.extend(nested("environments.<name>.", fields_of::<Environment>()));
        schema.extend(nested("registry_login.", fields_of::<RegistryLogin>()));
        schema.extend(
            nested("images[].", fields_of::<Image>())
                .into_iter()
                .filter(|f| f != "images[].seed"),
        );
        schema.extend(nested("images[].seed.", fields_of::<Seed>()));
        for service in ["backend", "frontend"] {
            schema.extend(nested(
                &format!("local.{service}."),
                fields_of::<LocalService>(),
            ));
        }
        schema.extend(
            nested("local.", fields_of::<LocalStack>())
                .into_iter()
                .filter(|f| f != "local.backend" && f != "local.frontend"),
        );
        assert!(schema.len() > 30, "{schema:?}");
        let docs = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
        )
        .unwrap();
        let keys = docs
            .split("## Keys")
            .nth(1)
            .unwrap()
            .split("\n## ")
            .next()
            .unwrap();
        let documented: BTreeSet<String> = keys
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|line| line.split('`').next())
            .map(str::to_owned)
            .collect();
        assert_eq!(
            documented, schema,
            "docs/configuration.md's keys and the schema's"
        );
    }
}
