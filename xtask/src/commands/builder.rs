//! `cargo xtask builder up|down`: the pinned BuildKit as a service reached
//! over mutual TLS (see `crate::remote`), for `--builder`.

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::{
    commands::cluster_flags::ClusterFlags, config::Config, exec::Exec, exit::refuse, kube::Kube,
    remote,
};

/// Run the pinned BuildKit as a service reached over mutual TLS, in the cluster or on this machine, for `--builder`
#[derive(Args, Debug)]
pub struct Builder {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// Deploy (--in-cluster) or start the pinned BuildKit with mutual TLS, create a buildx `remote` builder for it, print BUILDER=<name>
    Up(Up),
    /// Remove exactly what `builder up` made: the namespace or container, the buildx builder, the certificates
    Down(Down),
}

#[derive(Args, Debug)]
struct Up {
    /// In a namespace of the current (or --context) cluster, as a Deployment
    #[arg(long)]
    in_cluster: bool,
    /// Pods of the Deployment (one on a loopback address: the node's network)
    #[arg(long, default_value_t = 1, requires = "in_cluster")]
    replicas: u32,
    /// HOST:PORT buildx connects to; a loopback one puts the pods on the node's network [default: 127.0.0.1:1234 in the cluster, 127.0.0.1:1235 here]
    #[arg(long)]
    address: Option<String>,
    /// The BuildKit image the cluster's nodes pull [default: the local registry's copy on a loopback address, else moby/buildkit:<buildkit>]
    #[arg(long, requires = "in_cluster")]
    image: Option<String>,
    /// The namespace `up --in-cluster` makes
    #[arg(long, default_value = "xtask-buildkit", requires = "in_cluster")]
    namespace: String,
    /// The buildx builder's name [default: xtask-buildkit-cluster, or xtask-buildkit-local]
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    cluster: ClusterFlags,
}

#[derive(Args, Debug)]
struct Down {
    /// The in-cluster builder's default name
    #[arg(long)]
    in_cluster: bool,
    /// The builder `up` made under this name
    #[arg(long)]
    name: Option<String>,
    /// The cluster is gone or unreachable: remove the buildx builder and the certificates, and leave its namespace
    #[arg(long)]
    local_only: bool,
    #[command(flatten)]
    cluster: ClusterFlags,
}

/// The builder's name: `--name`, else the default for where it runs.
fn name_of(name: &Option<String>, in_cluster: bool) -> String {
    name.clone().unwrap_or_else(|| {
        if in_cluster {
            "xtask-buildkit-cluster"
        } else {
            "xtask-buildkit-local"
        }
        .to_owned()
    })
}

impl Builder {
    pub fn run(self, exec: &Exec) -> Result<()> {
        match self.action {
            Action::Up(up) => up.run(exec),
            Action::Down(down) => down.run(exec),
        }
    }
}

impl Up {
    fn run(self, exec: &Exec) -> Result<()> {
        let name = name_of(&self.name, self.in_cluster);
        let address = self.address.clone().unwrap_or_else(|| {
            if self.in_cluster {
                "127.0.0.1:1234"
            } else {
                "127.0.0.1:1235"
            }
            .to_owned()
        });
        if self.replicas == 0 {
            return Err(refuse("--replicas must be at least 1"));
        }
        if self.in_cluster {
            let (config, kube) = exec.step("preflight", || {
                let (config, kube, _) = self.cluster.connect(exec, true)?;
                remote::preflight(exec, &name, &address)?;
                remote::preflight_cluster(exec, &kube, &self.namespace, self.replicas, &address)?;
                Ok((config, kube))
            })?;
            exec.step(format!("BuildKit in namespace {}", self.namespace), || {
                remote::up_in_cluster(
                    exec,
                    &config,
                    &kube,
                    &name,
                    &self.namespace,
                    self.replicas,
                    &address,
                    self.image.as_deref(),
                )
            })?;
        } else {
            let config = exec.step("preflight", || {
                let config = Config::load(exec, &self.cluster.overrides)?;
                remote::preflight(exec, &name, &address)?;
                Ok(config)
            })?;
            exec.step("BuildKit on this machine", || {
                remote::up_local(exec, &config, &name, &address)
            })?;
        }
        exec.output.result(&format!("BUILDER={name}"));
        Ok(())
    }
}

impl Down {
    fn run(self, exec: &Exec) -> Result<()> {
        let name = name_of(&self.name, self.in_cluster);
        remote::check_name(&name)?;
        let Some(record) = remote::record(&exec.env, &name)? else {
            exec.output.result(&format!(
                "no builder {name} made by `builder up`: nothing to remove"
            ));
            return Ok(());
        };
        let config = Config::load(exec, &self.cluster.overrides)?;
        let kube = match &record.cluster {
            Some((context, namespace)) if self.local_only => {
                exec.output.warn(&format!(
                    "--local-only: namespace {namespace} in context {context} stays; delete it there when the cluster is back"
                ));
                None
            }
            Some((context, _)) => {
                if let Some(asked) = self.cluster.context.as_ref().filter(|c| *c != context) {
                    return Err(refuse(format!(
                        "builder {name} was made in context {context}, not {asked}: `builder down` removes it there"
                    )));
                }
                Some(Kube::connect(exec, &config, Some(context), true)?.0)
            }
            None => None,
        };
        remote::down(exec, kube.as_ref(), &record)?;
        exec.output.result(&format!("builder {name} removed"));
        // Its own cache ref (`{builder}` in cache_to) stays: the other
        // builders import it, so the next one to build starts warm.
        let own: Vec<String> = config
            .cache_to
            .iter()
            .filter(|to| to.contains("{builder}"))
            .map(|to| to.replace("{builder}", &name))
            .collect();
        if !own.is_empty() {
            exec.output.result(&format!(
                "its registry cache stays, since other builders import it ({}); `cargo xtask clean` removes the local registry's",
                own.join(", ")
            ));
        }
        Ok(())
    }
}
