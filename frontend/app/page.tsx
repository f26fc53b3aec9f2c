import { version } from "@/lib/version";
import { BackendCheck } from "./backend-check";

// Prerendered at build time: the frontend's revision is in the HTML itself.
export default function Home() {
  return (
    <main data-revision={version.revision}>
      <h1>Which code is running?</h1>
      <BackendCheck frontendRevision={version.revision} />
    </main>
  );
}
