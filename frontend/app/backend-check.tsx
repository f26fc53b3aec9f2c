"use client";

import { useEffect, useState } from "react";

type State =
  | { name: "checking" }
  | { name: "match" | "differ"; backend: string }
  | { name: "unreachable"; reason: string };

// The backend's public address when the deploy baked one in (the seed
// flow); otherwise the frontend's same-origin proxy.
const BACKEND_VERSION_URL = process.env.NEXT_PUBLIC_BACKEND_URL
  ? `${process.env.NEXT_PUBLIC_BACKEND_URL.replace(/\/+$/, "")}/version`
  : "/backend/version";

const MESSAGES = {
  checking: "Checking the backend…",
  match: "Revisions match: frontend and backend run the same commit.",
  differ: "Revisions differ: frontend and backend run different commits.",
};

export function BackendCheck({ frontendRevision }: { frontendRevision: string }) {
  const [state, setState] = useState<State>({ name: "checking" });
  useEffect(() => {
    fetch(BACKEND_VERSION_URL, { cache: "no-store" })
      .then((response) => {
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        return response.json();
      })
      .then((backend: { revision: string; dirty: boolean }) => {
        const shown = backend.revision + (backend.dirty ? " (dirty)" : "");
        setState({ name: backend.revision === frontendRevision ? "match" : "differ", backend: shown });
      })
      .catch((error: Error) => setState({ name: "unreachable", reason: error.message }));
  }, [frontendRevision]);

  return (
    <>
      <table>
        <thead>
          <tr><th>Component</th><th>Revision</th></tr>
        </thead>
        <tbody>
          <tr><td>frontend</td><td><code id="frontend-revision">{frontendRevision}</code></td></tr>
          <tr><td>backend</td><td><code id="backend-revision">{"backend" in state ? state.backend : "…"}</code></td></tr>
        </tbody>
      </table>
      <p id="backend-source">Backend asked at <code>{BACKEND_VERSION_URL}</code></p>
      <p id="state" data-state={state.name}>
        {state.name === "unreachable" ? `Backend unreachable: ${state.reason}` : MESSAGES[state.name]}
      </p>
    </>
  );
}
