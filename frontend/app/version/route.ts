import { version } from "@/lib/version";

// Rendered once at build time: the revision this image was built from.
export const dynamic = "force-static";

export function GET(): Response {
  return Response.json(version);
}
