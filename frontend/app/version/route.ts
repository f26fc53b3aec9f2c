import { version } from "@/lib/version";

// The revision this image was built from (inlined at build time). Answered
// per request with no-store, so no CDN can keep an old one after a deploy.
export const dynamic = "force-dynamic";

export function GET(): Response {
  return Response.json(version, { headers: { "cache-control": "no-store" } });
}
