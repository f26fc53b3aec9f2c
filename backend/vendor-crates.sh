#!/bin/sh
# Unpacks every crate Cargo.lock pins from the dependency store into a cargo
# vendor directory, after checking each .crate file against the lockfile's
# sha256 checksum. A store that does not match the lockfile fails here,
# naming the crate, so nothing unchecked is ever compiled.
#
# usage: vendor-crates.sh <store>/crates <Cargo.lock> <vendor dir>
set -eu
store=$1 lock=$2 vendor=$3
mkdir -p "$vendor"
awk -F'"' '
  /^\[\[package\]\]/ { name = ""; version = ""; source = ""; next }
  /^name = /     { name = $2 }
  /^version = /  { version = $2 }
  /^source = /   { source = $2; if (source !~ /^registry\+/) print name, version, "git" }
  /^checksum = / { print name, version, $2 }
' "$lock" | {
  count=0
  while read -r name version checksum; do
    if [ "$checksum" = git ]; then
      echo "dependency store: $name $version is not from a registry; only registry crates can be stored" >&2
      exit 1
    fi
    crate="$store/$name-$version.crate"
    if [ ! -f "$crate" ]; then
      echo "dependency store: $name $version is missing from the store; Cargo.lock needs it" >&2
      exit 1
    fi
    actual=$(sha256sum "$crate" | cut -d' ' -f1)
    if [ "$actual" != "$checksum" ]; then
      echo "dependency store: $name $version does not match Cargo.lock: its .crate hashes to sha256 $actual, the lockfile says $checksum" >&2
      exit 1
    fi
    tar -xzf "$crate" -C "$vendor"
    # The package checksum ties the unpacked crate to Cargo.lock for cargo too.
    printf '{"files":{},"package":"%s"}' "$checksum" >"$vendor/$name-$version/.cargo-checksum.json"
    count=$((count + 1))
  done
  echo "dependency store: $count crates match Cargo.lock" >&2
}
