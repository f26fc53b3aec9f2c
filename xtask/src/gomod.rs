//! Go modules from the module proxy, for the tools the xtask compiles
//! itself (Kubernetes for the test cluster, BuildKit where its image
//! cannot be pulled).

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::exec::{Cmd, Exec};

/// A module `go mod download` put in the module cache.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Module {
    /// Its unpacked source (read-only).
    pub dir: Option<String>,
    /// Its go.mod.
    pub go_mod: Option<String>,
    error: Option<String>,
}

/// `go mod download -json MODULE@VERSION`.
pub fn download_command(module: &str) -> Cmd {
    Cmd::new("go").args(["mod", "download", "-json", module])
}

/// The module `go mod download -json MODULE@VERSION` put in the module
/// cache, or the error it reports.
pub fn download(exec: &Exec, module: &str) -> Result<Module> {
    let json = exec.read(&download_command(module))?;
    let download: Module =
        serde_json::from_str(&json).context("parsing `go mod download -json`")?;
    if let Some(error) = &download.error {
        anyhow::bail!("{module} could not be downloaded: {error}");
    }
    Ok(download)
}
