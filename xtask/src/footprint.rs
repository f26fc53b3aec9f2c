//! What a test run leaves behind. `cargo xtask test` takes a snapshot of
//! the test cluster's namespaces, the local registry's tags and Docker's
//! containers, images and volumes before `cargo test`, and another after
//! it; anything new in the second is something a test made and did not
//! remove, named so it can be found.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::{
    docker::json_lines,
    exec::{Cmd, Exec},
    registry, registry_delete,
};

/// Everything a test could make, each keyed by what identifies it and
/// mapped to how it is named in the report.
#[derive(Default)]
pub struct Footprint {
    namespaces: BTreeMap<String, String>,
    tags: BTreeMap<String, String>,
    containers: BTreeMap<String, String>,
    images: BTreeMap<String, String>,
    volumes: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Namespaces {
    items: Vec<NamespaceItem>,
}

#[derive(Deserialize)]
struct NamespaceItem {
    metadata: Metadata,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Container {
    #[serde(rename = "ID")]
    id: String,
    names: String,
    state: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Image {
    #[serde(rename = "ID")]
    id: String,
    repository: String,
    tag: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Volume {
    name: String,
}

impl Footprint {
    /// Takes the snapshot: `kubectl` reaches the test cluster, `registry`
    /// is the local registry's `host:port`.
    pub fn take(exec: &Exec, registry: &str) -> Result<Footprint> {
        let tags = registry_delete::tagged_under(registry::host_of(registry), "")
            .map_err(anyhow::Error::msg)
            .context("listing the local registry's tags")?;
        let containers: Vec<Container> = json_lines(
            exec,
            &Cmd::new("docker").args(["ps", "--all", "--no-trunc", "--format", "{{json .}}"]),
        )?;
        let images: Vec<Image> = json_lines(
            exec,
            &Cmd::new("docker").args(["images", "--all", "--no-trunc", "--format", "{{json .}}"]),
        )?;
        let volumes: Vec<Volume> = json_lines(
            exec,
            &Cmd::new("docker").args(["volume", "ls", "--format", "{{json .}}"]),
        )?;
        let mut footprint = Footprint {
            namespaces: keyed(namespaces(exec)?),
            tags: keyed(tags),
            volumes: keyed(volumes.into_iter().map(|v| v.name)),
            ..Footprint::default()
        };
        for c in containers {
            let name = format!("{} ({}, {})", c.names, short(&c.id), c.state);
            footprint.containers.insert(c.id, name);
        }
        for i in images {
            let name = if i.repository == "<none>" {
                short(&i.id).to_owned()
            } else {
                format!("{}:{} ({})", i.repository, i.tag, short(&i.id))
            };
            // One image under several tags is one image, named by each.
            footprint
                .images
                .entry(i.id)
                .and_modify(|n| {
                    n.push_str(", ");
                    n.push_str(&name);
                })
                .or_insert(name);
        }
        Ok(footprint)
    }

    /// The test cluster's namespaces now that `self` did not have.
    pub fn new_namespaces(&self, exec: &Exec) -> Result<Vec<String>> {
        Ok(added(&self.namespaces, &keyed(namespaces(exec)?)))
    }

    /// What is in `self` and was not in `before`, one line per kind.
    pub fn left_since(&self, before: &Footprint) -> Vec<String> {
        [
            (
                "namespaces in the test cluster",
                &before.namespaces,
                &self.namespaces,
            ),
            ("tags in the local registry", &before.tags, &self.tags),
            ("Docker containers", &before.containers, &self.containers),
            ("Docker images", &before.images, &self.images),
            ("Docker volumes", &before.volumes, &self.volumes),
        ]
        .into_iter()
        .filter_map(|(what, before, after)| {
            let new = added(before, after);
            (!new.is_empty()).then(|| format!("{} {what}: {}", new.len(), new.join("; ")))
        })
        .collect()
    }
}

/// The test cluster's namespaces (`kubectl` reaches it).
fn namespaces(exec: &Exec) -> Result<Vec<String>> {
    let listed: Namespaces = serde_json::from_str(&exec.read(&Cmd::new("kubectl").args([
        "get",
        "namespaces",
        "--output",
        "json",
    ]))?)
    .context("parsing `kubectl get namespaces`")?;
    Ok(listed.items.into_iter().map(|n| n.metadata.name).collect())
}

fn keyed(names: impl IntoIterator<Item = String>) -> BTreeMap<String, String> {
    names.into_iter().map(|n| (n.clone(), n)).collect()
}

fn added(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let old: BTreeSet<&String> = before.keys().collect();
    after
        .iter()
        .filter(|(key, _)| !old.contains(key))
        .map(|(_, name)| name.clone())
        .collect()
}

fn short(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_is_new_is_named() {
        let before = Footprint {
            namespaces: keyed(["default".to_owned()]),
            tags: keyed(["library/debian:bookworm-slim".to_owned()]),
            ..Footprint::default()
        };
        let mut after = Footprint {
            namespaces: keyed(["default".to_owned(), "life-1".to_owned()]),
            tags: keyed(["library/debian:bookworm-slim".to_owned()]),
            ..Footprint::default()
        };
        after.images.insert("sha256:abc".into(), "x:1 (abc)".into());
        assert_eq!(
            after.left_since(&before),
            [
                "1 namespaces in the test cluster: life-1",
                "1 Docker images: x:1 (abc)"
            ]
        );
        assert!(before.left_since(&before).is_empty());
    }
}
