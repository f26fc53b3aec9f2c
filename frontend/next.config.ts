import type { NextConfig } from "next";

// The revision is read from the build args once, at build time, and inlined:
// what /version and the page report is what this image was built from.
const nextConfig: NextConfig = {
  output: "standalone",
  poweredByHeader: false,
  // The commit, not a random id: two builds of one commit are one image.
  generateBuildId: async () => process.env.GIT_REVISION ?? null,
  env: {
    AIQ_REVISION: process.env.GIT_REVISION ?? "unknown",
    AIQ_DIRTY: process.env.GIT_DIRTY ?? "false",
    AIQ_COMMIT_TIME: process.env.GIT_COMMIT_TIME ?? "unknown",
  },
};

export default nextConfig;
