// serve.js sets this flag on SIGTERM; route handlers run in the same
// process, so /readyz sees it through the shared global object.
const DRAINING = Symbol.for("aiq.draining");

export function isDraining(): boolean {
  return (globalThis as Record<symbol, unknown>)[DRAINING] === true;
}
