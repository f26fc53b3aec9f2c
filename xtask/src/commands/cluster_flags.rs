//! The flags of the commands that read or change a cluster (`status`,
//! `verify`, `rollback`), and how they load the configuration and connect.

use anyhow::Result;

use crate::{
    config::{Config, Overrides},
    exec::Exec,
    kube::Kube,
};

/// Which cluster a command reads or changes: the configuration (with
/// `--env`) and, to go elsewhere on purpose, `--context`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClusterFlags {
    /// Kube context to use; needed for any but the configured one
    #[arg(long, value_name = "CONTEXT")]
    pub context: Option<String>,
    #[command(flatten)]
    pub overrides: Overrides,
}

impl ClusterFlags {
    /// Loads the configuration, works from the workspace root, and connects
    /// (see [`Kube::connect`]).
    pub fn connect<'a>(
        &self,
        exec: &'a Exec<'a>,
        need_reachable: bool,
    ) -> Result<(Config, Kube<'a>, bool)> {
        let config = Config::load(exec, &self.overrides)?;
        exec.sh.change_dir(&config.root);
        let (kube, reachable) =
            Kube::connect(exec, &config, self.context.as_deref(), need_reachable)?;
        Ok((config, kube, reachable))
    }
}
