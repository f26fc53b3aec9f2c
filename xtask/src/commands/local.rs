//! What `up` and `down` share: the labels, names and docker queries that let
//! them find their own containers and networks and nothing else.

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::exec::{Cmd, Exec};

pub const PROJECT_LABEL: &str = "org.aiq.xtask.project";
pub const REVISION_LABEL: &str = "org.aiq.xtask.revision";
pub const COMPONENT_LABEL: &str = "org.aiq.xtask.component";
pub const SLOT_LABEL: &str = "org.aiq.xtask.slot";

pub fn network_name(project: &str) -> String {
    format!("{project}-net")
}

/// One line of `docker ps --format json`.
#[derive(Debug, Deserialize)]
pub struct ContainerEntry {
    #[serde(rename = "Names")]
    pub name: String,
}

/// The project's containers, running or not, optionally only one slot.
pub fn containers(exec: &Exec, project: &str, slot: Option<&str>) -> Result<Vec<ContainerEntry>> {
    let mut cmd = Cmd::new("docker")
        .args(["ps", "--all", "--format", "json", "--filter"])
        .arg(format!("label={PROJECT_LABEL}={project}"));
    if let Some(slot) = slot {
        cmd = cmd
            .arg("--filter")
            .arg(format!("label={SLOT_LABEL}={slot}"));
    }
    parse_json_lines(&exec.read(&cmd)?)
}

/// Removes the project's containers (only `slot`'s, if given).
pub fn remove_containers(exec: &Exec, project: &str, slot: Option<&str>) -> Result<()> {
    let names: Vec<String> = containers(exec, project, slot)?
        .into_iter()
        .map(|c| c.name)
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    exec.run(&Cmd::new("docker").args(["rm", "--force"]).args(names))
}

/// The project's networks, by name.
pub fn networks(exec: &Exec, project: &str) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(rename = "Name")]
        name: String,
    }
    let cmd = Cmd::new("docker")
        .args(["network", "ls", "--format", "json", "--filter"])
        .arg(format!("label={PROJECT_LABEL}={project}"));
    let entries: Vec<Entry> = parse_json_lines(&exec.read(&cmd)?)?;
    Ok(entries.into_iter().map(|e| e.name).collect())
}

pub fn parse_json_lines<T: serde::de::DeserializeOwned>(text: &str) -> Result<Vec<T>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).with_context(|| format!("parsing docker's JSON line {l:?}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_ps_json_lines() {
        let text = r#"{"Names":"aiq-aiq-agent-0123456789ab","Labels":"org.aiq.xtask.project=aiq,org.aiq.xtask.slot=live","State":"running"}
"#;
        let entries: Vec<ContainerEntry> = parse_json_lines(text).unwrap();
        assert_eq!(entries[0].name, "aiq-aiq-agent-0123456789ab");
    }
}
