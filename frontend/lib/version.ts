// The build's identity, inlined by next.config.ts from the build args; the
// same JSON shape as the backend's /version.
export const version = {
  service: "aiq-frontend",
  revision: process.env.AIQ_REVISION ?? "unknown",
  dirty: process.env.AIQ_DIRTY === "true",
  commit_time: process.env.AIQ_COMMIT_TIME ?? "unknown",
};
