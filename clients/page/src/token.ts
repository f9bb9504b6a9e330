/** What the page reads from its fragment: `/chat#token=<user JWT>&workflow=<name>&chat=<chat_id>`. */
export interface PageParams {
  token?: string;
  workflow?: string;
  chat?: string;
}

export function readParams(hash: string): PageParams {
  const p = new URLSearchParams(hash.replace(/^#/, ""));
  const out: PageParams = {};
  for (const k of ["token", "workflow", "chat"] as const) {
    const v = p.get(k);
    if (v) out[k] = v;
  }
  return out;
}

export function writeParams(params: PageParams): string {
  const p = new URLSearchParams();
  for (const k of ["token", "workflow", "chat"] as const) {
    const v = params[k];
    if (v) p.set(k, v);
  }
  return `#${p.toString()}`;
}

/** The claims of a JWT, unverified (the server verifies; the page only needs `app_id` and `sub`). */
export function claimsOf(token: string): { sub?: string; app_id?: string; exp?: number } {
  try {
    const part = token.split(".")[1] ?? "";
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const text = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
    const bytes = Uint8Array.from(text, (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes)) as { sub?: string; app_id?: string; exp?: number };
  } catch {
    return {};
  }
}
