// The image's entry point. Next's own signal handlers exit at once; this one
// drains like the backend: /readyz answers 503 after SIGTERM, and the process
// exits once in-flight requests had DRAIN_SECONDS to finish.
process.env.NEXT_MANUAL_SIG_HANDLE = "true";
// Docker and Kubernetes set HOSTNAME to the container's name, which Next's
// server would bind to; it must listen on every address.
process.env.HOSTNAME = "0.0.0.0";
const drainSeconds = Number(process.env.DRAIN_SECONDS ?? "5");

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.once(signal, () => {
    globalThis[Symbol.for("aiq.draining")] = true;
    console.error(`${signal}: draining for ${drainSeconds}s, then exiting`);
    setTimeout(() => process.exit(0), drainSeconds * 1000);
  });
}

await import("./server.js");
