import { isDraining } from "@/lib/draining";

// 503 once SIGTERM arrived, so endpoints drop the pod before it exits.
export const dynamic = "force-dynamic";

export function GET(): Response {
  return isDraining()
    ? new Response("draining", { status: 503 })
    : new Response("ready");
}
