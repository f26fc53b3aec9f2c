// Checks the dependency store (an npm cache) against package-lock.json before
// npm installs from it: every package in the store must hash to the
// lockfile's integrity, and every package that is not optional must be
// there. A store that does not match fails the build here, naming the
// package. Optional packages for another platform are never fetched, so
// their absence is npm's to judge: `npm ci --offline` fails on any it needs.
//
// usage: node verify-deps.mjs <npm cache dir> <package-lock.json>
import { createHash } from "node:crypto";
import { createReadStream, existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";

const [cacheDir, lockPath] = process.argv.slice(2);
const lock = JSON.parse(readFileSync(lockPath, "utf8"));
let checked = 0;
for (const [path, entry] of Object.entries(lock.packages ?? {})) {
  if (path === "" || entry.link || !entry.integrity) continue;
  const name = `${path.replace(/^.*node_modules\//, "")} ${entry.version} (${path})`;
  const sri = entry.integrity.split(/\s+/).find((hash) => hash.startsWith("sha512-"));
  if (!sri) fail(`${name}: the lockfile has no sha512 integrity (${entry.integrity})`);
  const hex = Buffer.from(sri.slice("sha512-".length), "base64").toString("hex");
  const file = join(cacheDir, "_cacache", "content-v2", "sha512", hex.slice(0, 2), hex.slice(2, 4), hex.slice(4));
  if (!existsSync(file)) {
    if (entry.optional) continue;
    fail(`${name} is missing from the store; package-lock.json needs it`);
  }
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
