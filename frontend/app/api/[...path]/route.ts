import { forward } from "@/lib/proxy";

// Same-origin access to the backend's API: /api/* keeps its path.
export const dynamic = "force-dynamic";

function handle(request: Request): Promise<Response> {
  return forward(request, new URL(request.url).pathname);
}

export { handle as GET, handle as POST, handle as PUT, handle as PATCH, handle as DELETE, handle as HEAD, handle as OPTIONS };
