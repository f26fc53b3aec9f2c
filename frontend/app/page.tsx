import { version } from "@/lib/version";
import { BackendCheck } from "./backend-check";

// The frontend's revision is in the HTML itself. Rendered per request with
// no-store, so no CDN can keep an old page after a deploy.
export const dynamic = "force-dynamic";

export default function Home() {
  return (
    <main data-revision={version.revision}>
      <h1>Which code is running?</h1>
      <BackendCheck frontendRevision={version.revision} />
    </main>
  );
}
