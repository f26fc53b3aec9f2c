//! `cargo xtask cluster up|down`: the real single-node Kubernetes the
//! tests deploy to (see `crate::cluster`).

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::{cluster, exec::Exec};

/// Build, start or stop the single-node test cluster (root; see the README)
#[derive(Args, Debug)]
pub struct Cluster {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// Build what is missing, start the cluster (or find it running), print KUBECONFIG=<path>
    Up,
    /// Stop what `up` started and remove its state
    Down,
}

impl Cluster {
    pub fn run(self, exec: &Exec) -> Result<()> {
        match self.action {
            Action::Up => {
                let kubeconfig = cluster::up(exec)?;
                exec.output
                    .result(&format!("KUBECONFIG={}", kubeconfig.display()));
                Ok(())
            }
            Action::Down => cluster::down(exec),
        }
    }
}
