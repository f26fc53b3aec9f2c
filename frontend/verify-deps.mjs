// Checks the dependency store (an npm cache) against package-lock.json before
// npm installs from it: every package npm will install on this platform must
// be in the store, and its tarball's bytes must hash to the lockfile's
// integrity. A store that does not match fails the build here, naming the
// package, so nothing unchecked is ever installed.
//
// usage: node verify-deps.mjs <npm cache dir> <package-lock.json>
import { createHash } from "node:crypto";
import { createReadStream, existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";

const [cacheDir, lockPath] = process.argv.slice(2);
const lock = JSON.parse(readFileSync(lockPath, "utf8"));
const libc = process.report.getReport().header.glibcVersionRuntime ? "glibc" : "musl";

// npm skips optional packages built for another os, cpu or libc; so does the store.
function installsHere(entry) {
  const fits = (allowed, value) =>
    !allowed ||
    (allowed.some((a) => a === value) || (allowed.every((a) => a.startsWith("!")) && !allowed.includes(`!${value}`)));
  return fits(entry.os, process.platform) && fits(entry.cpu, process.arch) && fits(entry.libc, libc);
}

let checked = 0;
for (const [path, entry] of Object.entries(lock.packages ?? {})) {
  if (path === "" || entry.link || !entry.integrity || !installsHere(entry)) continue;
  const name = `${path.replace(/^.*node_modules\//, "")} ${entry.version} (${path})`;
  const sri = entry.integrity.split(/\s+/).find((hash) => hash.startsWith("sha512-"));
  if (!sri) fail(`${name}: the lockfile has no sha512 integrity (${entry.integrity})`);
  const hex = Buffer.from(sri.slice("sha512-".length), "base64").toString("hex");
  const file = join(cacheDir, "_cacache", "content-v2", "sha512", hex.slice(0, 2), hex.slice(2, 4), hex.slice(4));
  if (!existsSync(file)) fail(`${name} is missing from the store; package-lock.json needs it`);
  const hash = createHash("sha512");
  await pipeline(createReadStream(file), hash);
  const actual = hash.digest("base64");
  if (`sha512-${actual}` !== sri) {
    fail(`${name} does not match package-lock.json: its tarball hashes to sha512-${actual}, the lockfile says ${sri}`);
  }
  checked += 1;
}
console.error(`dependency store: ${checked} packages match package-lock.json`);

function fail(message) {
  console.error(`dependency store: ${message}`);
  process.exit(1);
}
