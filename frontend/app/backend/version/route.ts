import { forward } from "@/lib/proxy";

// The backend's /version, same-origin, for the page's revision check.
export const dynamic = "force-dynamic";

export function GET(request: Request): Promise<Response> {
  return forward(request, "/version");
}
