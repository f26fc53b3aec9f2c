// The keys `next build` would otherwise draw at random, derived from the
// xtask's build secret (a BuildKit secret, never in a layer), so two builds
// of one commit give the same image and no one can derive the keys from
// the source (README, "Provable builds").
//
//   node build-keys.mjs server-actions SECRET   prints the Server Actions key
//   node build-keys.mjs preview SECRET DIR      rewrites the preview keys
//                                              under DIR (.next)
import { createHmac } from "node:crypto";
import { readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const [command, secretFile, dir] = process.argv.slice(2);
const secret = readFileSync(secretFile);
if (secret.length < 32) {
  throw new Error(`${secretFile}: the build secret must hold at least 32 bytes`);
}
const derive = (purpose, bytes) =>
  createHmac("sha256", secret).update(`aiq-frontend ${purpose}`).digest().subarray(0, bytes);

// Next draws previewModeId (16 bytes) and the signing and encryption keys
// (32 bytes each) in every build, and offers no setting for them.
const preview = {
  previewModeId: derive("preview mode id", 16).toString("hex"),
  previewModeSigningKey: derive("preview mode signing key", 32).toString("hex"),
  previewModeEncryptionKey: derive("preview mode encryption key", 32).toString("hex"),
};

function* files(root) {
  for (const name of readdirSync(root)) {
    const path = join(root, name);
    if (statSync(path).isDirectory()) {
      if (name !== "cache") yield* files(path);
    } else {
      yield path;
    }
  }
}

if (command === "server-actions") {
  // AES-256: 32 bytes, base64 (NEXT_SERVER_ACTIONS_ENCRYPTION_KEY).
  process.stdout.write(derive("server actions key", 32).toString("base64"));
} else if (command === "preview" && dir) {
  let rewritten = 0;
  for (const path of files(dir)) {
    const name = path.split("/").pop();
    if (name === "prerender-manifest.json") {
      const manifest = JSON.parse(readFileSync(path, "utf8"));
      manifest.preview = preview;
      writeFileSync(path, JSON.stringify(manifest));
      rewritten++;
    } else if (name === "preview-props.json") {
      writeFileSync(path, JSON.stringify(preview));
      rewritten++;
    }
  }
  if (rewritten === 0) {
    throw new Error(`no prerender-manifest.json under ${dir}: did next build run?`);
  }
  console.error(`preview keys derived from the build secret in ${rewritten} files`);
} else {
  throw new Error("usage: build-keys.mjs server-actions SECRET | preview SECRET DIR");
}
