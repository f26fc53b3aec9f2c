//! `cargo xtask down`: removes what `up` started, and nothing else.

use anyhow::Result;
use clap::Args;

use crate::{
    commands::local::{networks, remove_containers},
    exec::{Cmd, Exec},
    registry,
};

/// Stop and remove the local stack that `up` started
#[derive(Args, Debug)]
pub struct Down {
    /// Also stop the local registry
    #[arg(long)]
    pub all: bool,
    /// Name of the local stack (containers and networks are labelled with it)
    #[arg(long, default_value = "aiq", value_name = "NAME")]
    pub project: String,
}

impl Down {
    pub fn run(self, exec: &Exec) -> Result<()> {
        remove_containers(exec, &self.project, None)?;
        for network in networks(exec, &self.project)? {
            exec.run(&Cmd::new("docker").args(["network", "rm", &network]))?;
        }
        if self.all {
            registry::stop(exec)?;
        }
        eprintln!("local stack {:?} is down", self.project);
        Ok(())
    }
}
