//! Emptying repositories of a registry through its API (Distribution's
//! `DELETE /v2/<name>/manifests/<digest>`), and listing what it holds.
//! Only `std` and `serde_json`, so the tests' guards include this same
//! file (`tests/common`) and `cargo xtask test` uses it for the run's
//! shared images and its leftover check.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

/// Every manifest kind a build pushes, so a HEAD answers the digest the
/// tag points to rather than a converted one.
const MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// A catalog page: Distribution answers at most 1000 names per request.
const PAGE: usize = 1000;

/// The repositories of `registry` (`host:port`), every page of the catalog.
pub fn repositories(registry: &str) -> Result<Vec<String>, String> {
    let mut all: Vec<String> = Vec::new();
    loop {
        let last = all
            .last()
            .map_or(String::new(), |name| format!("&last={name}"));
        let body = get_json(registry, &format!("/v2/_catalog?n={PAGE}{last}"))?;
        let page: Vec<String> = names(&body["repositories"]);
        let full = page.len() == PAGE;
        all.extend(page);
        if !full {
            return Ok(all);
        }
    }
}

/// The tags of `repository` (none when it has none left or is unknown).
pub fn tags(registry: &str, repository: &str) -> Result<Vec<String>, String> {
    let (status, _, body) = request(registry, "GET", &format!("/v2/{repository}/tags/list"))?;
    match status {
        200 => Ok(names(&parse(&body, repository)?["tags"])),
        404 => Ok(Vec::new()),
        other => Err(format!(
            "{registry}: listing the tags of {repository} answered {other}"
        )),
    }
}

/// Every `repository:tag` of `registry` whose repository is `path` or
/// under `path/` (all of them for an empty `path`).
pub fn tagged_under(registry: &str, path: &str) -> Result<Vec<String>, String> {
    let mut found = Vec::new();
    for repository in repositories(registry)? {
        if !is_under(&repository, path) {
            continue;
        }
        for tag in tags(registry, &repository)? {
            found.push(format!("{repository}:{tag}"));
        }
    }
    Ok(found)
}

/// Deletes every tagged manifest of the repositories of `registry` that
/// are `path` or under `path/` (an index with the manifests it lists),
/// and returns the `repository:tag`s that were there. The blobs stay
/// until the registry's garbage collection.
pub fn delete_under(registry: &str, path: &str) -> Result<Vec<String>, String> {
    let tagged = tagged_under(registry, path)?;
    for reference in &tagged {
        let (repository, tag) = reference.rsplit_once(':').unwrap_or((reference, ""));
        let (status, headers, body) = request(
            registry,
            "GET",
            &format!("/v2/{repository}/manifests/{tag}"),
        )?;
        // An earlier tag of the same manifest took this one with it.
        if status == 404 {
            continue;
        }
        let digest = headers
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("docker-content-digest")
                    .then(|| value.trim().to_owned())
            })
            .ok_or_else(|| {
                format!("{registry}: no digest for {reference} (GET answered {status})")
            })?;
        let listed: Vec<String> = parse(&body, reference)?["manifests"]
            .as_array()
            .map(|manifests| {
                manifests
                    .iter()
                    .filter_map(|m| m["digest"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        for digest in std::iter::once(digest).chain(listed) {
            let (status, _, body) = request(
                registry,
                "DELETE",
                &format!("/v2/{repository}/manifests/{digest}"),
            )?;
            if status != 202 && status != 404 {
                return Err(format!(
                    "{registry}: deleting {repository}@{digest} (tagged {tag}) answered {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                ));
            }
        }
    }
    Ok(tagged)
}

fn is_under(repository: &str, path: &str) -> bool {
    path.is_empty()
        || repository == path
        || repository
            .strip_prefix(path)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn get_json(registry: &str, path: &str) -> Result<serde_json::Value, String> {
    let (status, _, body) = request(registry, "GET", path)?;
    if status != 200 {
        return Err(format!("{registry}{path} answered {status}"));
    }
    parse(&body, path)
}

fn parse(body: &[u8], what: &str) -> Result<serde_json::Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("{what}: not JSON: {e}"))
}

fn names(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `METHOD path` over HTTP/1.0 (answers come whole, never chunked) →
/// (status, header lines, body).
fn request(registry: &str, method: &str, path: &str) -> Result<(u16, String, Vec<u8>), String> {
    let fail = |e: std::io::Error| format!("{method} {registry}{path}: {e}");
    let mut stream = TcpStream::connect(registry).map_err(fail)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(fail)?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {registry}\r\nAccept: {MANIFESTS}\r\n\r\n"
    )
    .map_err(fail)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(fail)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(response.len());
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {registry}{path}: not an HTTP answer"))?;
    let body = response.get(split + 4..).unwrap_or_default().to_vec();
    Ok((status, head, body))
}
