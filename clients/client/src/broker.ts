// HTTP calls to the runtime's API with a user token: the session broker, the workflow list, the
// transcript (read model).

import type { EventFrame, Ticket, TicketProvider, WorkflowInfo } from "./types.js";

/** A refused or failed HTTP call. `retryable`: the network, a 5xx or a 429. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly retryable: boolean,
  ) {
    super(message);
    this.name = "ApiError";
  }
}

export type TokenSource = string | (() => string | Promise<string>);

export interface ApiOptions {
  /** The API's base URL (`https://chat.example.com`), or several replicas tried in turn. */
  baseUrl: string | string[];
  /** The user's JWT, or a function that returns a current one. */
  token: TokenSource;
  fetch?: typeof fetch;
}

async function tokenOf(t: TokenSource): Promise<string> {
  return typeof t === "function" ? await t() : t;
}

const bases = (b: string | string[]) => (Array.isArray(b) ? b : [b]).map((u) => u.replace(/\/+$/, ""));

/** Calls the API; on a network error or a 502/503/504 the next base URL is tried. */
export async function apiCall<T>(opts: ApiOptions, method: string, path: string, body?: unknown): Promise<T> {
  const f = opts.fetch ?? globalThis.fetch.bind(globalThis);
  const token = await tokenOf(opts.token);
  let last: ApiError | undefined;
  for (const base of bases(opts.baseUrl)) {
    let res: Response;
    try {
      res = await f(`${base}${path}`, {
        method,
        headers: {
          authorization: `Bearer ${token}`,
          ...(body !== undefined ? { "content-type": "application/json" } : {}),
        },
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      });
    } catch (e) {
      last = new ApiError(0, "network", `cannot reach ${base}: ${String(e)}`, true);
      continue;
    }
    if (res.ok) return (await res.json()) as T;
    let code = `http_${res.status}`;
    let message = res.statusText;
    try {
      const err = (await res.json()) as { error?: { code?: string; message?: string } };
      code = err.error?.code ?? code;
      message = err.error?.message ?? message;
    } catch {
      // not JSON
    }
    const retryable = res.status === 429 || res.status >= 500;
    last = new ApiError(res.status, code, `${method} ${path}: ${res.status} ${code}: ${message}`, retryable);
    if (![502, 503, 504].includes(res.status)) throw last;
  }
  throw last ?? new ApiError(0, "network", "no base URL", true);
}

/**
 * A ticket provider that asks the broker (`POST /api/sessions`) with the user's token: a new chat
 * the first time, the same chat (`chat_id`) afterwards.
 */
export function brokerTickets(opts: ApiOptions): TicketProvider {
  return (req) =>
    apiCall<Ticket>(opts, "POST", "/api/sessions", {
      app_id: req.appId,
      workflow_name: req.workflowName,
      ...(req.chatId ? { chat_id: req.chatId } : {}),
      ...(req.context && !req.chatId ? { context: req.context } : {}),
    });
}

/** `GET /api/workflows`: the workflows the caller's app may run. */
export function listWorkflows(opts: ApiOptions): Promise<WorkflowInfo[]> {
  return apiCall<WorkflowInfo[]>(opts, "GET", "/api/workflows");
}

interface StoredMessage {
  seq: number;
  id: string;
  type: string;
  ts: string;
  data: unknown;
}

/** The chat's durable events after `after` from the read model (`GET /api/sessions/{id}/messages`). */
export async function fetchTranscript(opts: ApiOptions, chatId: string, after: number): Promise<EventFrame[]> {
  const out: EventFrame[] = [];
  let from = after;
  for (;;) {
    const page = await apiCall<{ messages: StoredMessage[] }>(
      opts,
      "GET",
      `/api/sessions/${encodeURIComponent(chatId)}/messages?after=${from}&limit=1000`,
    );
    for (const m of page.messages) {
      out.push({ id: m.id, seq: m.seq, ts: m.ts, type: m.type, data: m.data } as EventFrame);
    }
    const last = page.messages.at(-1);
    if (!last || page.messages.length < 1000) return out;
    from = last.seq;
  }
}
