// Forwards a request to the backend named by BACKEND_URL, read at run time
// so one image serves any environment. Bodies stream both ways, so
// server-sent events pass through.

const HOP_BY_HOP = ["connection", "keep-alive", "transfer-encoding", "host", "content-length"];

function backendUrl(): string {
  return (process.env.BACKEND_URL ?? "http://127.0.0.1:8000").replace(/\/+$/, "");
}

export async function forward(request: Request, path: string): Promise<Response> {
  const incoming = new URL(request.url);
  const target = `${backendUrl()}${path}${incoming.search}`;
  const headers = new Headers(request.headers);
  for (const name of HOP_BY_HOP) headers.delete(name);
  const hasBody = !["GET", "HEAD"].includes(request.method);
  try {
    const response = await fetch(target, {
      method: request.method,
      headers,
      body: hasBody ? request.body : undefined,
      redirect: "manual",
      cache: "no-store",
      signal: request.signal,
      // Node's fetch streams a request body only in half-duplex mode.
      ...(hasBody ? { duplex: "half" } : {}),
    } as RequestInit);
    const out = new Headers(response.headers);
    for (const name of HOP_BY_HOP) out.delete(name);
    out.delete("content-encoding");
    return new Response(response.body, { status: response.status, headers: out });
  } catch (error) {
    const reason = error instanceof Error ? (error.cause ?? error).toString() : String(error);
    return new Response(`backend ${backendUrl()} unreachable: ${reason}`, { status: 502 });
  }
}
