// The wire types of the runtime (DESIGN.md §4), on top of the types generated from schemas/.

import type { AgentDelta, ClientFrame, Envelope } from "./generated/schemas.js";

export type * from "./generated/schemas.js";

/** `{type, data}` of every durable event, one member per event type. */
export type EventBody = Envelope extends infer E
  ? E extends { type: infer T; data: infer D }
    ? { type: T; data: D }
    : never
  : never;

/** Every durable event type. */
export type EventType = EventBody["type"];

/** A durable event as the WebSocket delivers it: `{id, seq, type, ts, data}`, `seq` from 1, gapless. */
export type EventFrame = { id: string; seq: number; ts: string } & EventBody;

/** The `data` of an event of type `T`. */
export type EventData<T extends EventType> = Extract<EventBody, { type: T }>["data"];

/** An ephemeral frame (`"seq": null`). */
export type EphemeralFrame =
  | { id: string; seq: null; ts: string; type: "agent.delta"; data: AgentDelta }
  | { id: string; seq: null; ts: string; type: "ack"; data: AckData }
  | { id: string; seq: null; ts: string; type: "error"; data: ErrorData }
  | { id: string; seq: null; ts: string; type: "resync"; data: ResyncData }
  | { id: string; seq: null; ts: string; type: "pong"; data: Record<string, never> }
  | { id: string; seq: null; ts: string; type: "notification"; data: unknown };

/** Any server → client frame. */
export type ServerFrame = EventFrame | EphemeralFrame;

/** `ack`: the command is durable and will take effect in order. */
export interface AckData {
  command: "user.message" | "input.response" | "cancel";
  command_id: string;
}

/** `error`: a refused frame or command; the connection stays up. */
export interface ErrorData {
  code: string;
  message: string;
  command_id?: string;
}

/**
 * `resync`: `log_recreated` (the log was recreated: the client's seqs belong to another history;
 * the gateway replays from the start) or `log_truncated` (events after the client's seq are gone
 * from the log: reload the transcript from the read model, then apply the frames that follow,
 * from `first_seq`).
 */
export interface ResyncData {
  reason: "log_recreated" | "log_truncated" | string;
  epoch?: string;
  after?: number;
  first_seq?: number;
  message?: string;
}

export type { AgentDelta, ClientFrame };

/** `POST /api/sessions` answer: a ticket for one chat's WebSocket. */
export interface Ticket {
  chat_id: string;
  /** `ws(s)://host/ws/{workflow}/{app_id}/{chat_id}/{user_id}` */
  ws_url: string;
  runtime_token: string;
  /** RFC 3339 */
  expires_at: string;
  app_id: string;
  workflow_name: string;
  resumed: boolean;
  last_seq: number;
  epoch: string;
}

/** What a ticket provider is asked for. `chatId` is set once the chat exists. */
export interface TicketRequest {
  appId: string;
  workflowName: string;
  chatId?: string;
  /** Why: `start` (first ticket), `expired` (1008 or the ticket's expiry is near), `refused` (connections failed). */
  reason: "start" | "expired" | "refused";
  /** Context variables for a new chat. */
  context?: Record<string, unknown>;
}

/** Gets a ticket: from the broker with the user's token, or from the app's back-end (API key). */
export type TicketProvider = (req: TicketRequest) => Promise<Ticket>;

/** `GET /api/workflows` item. */
export interface WorkflowInfo {
  name: string;
  description: string;
}

/** The connection, as the client sees it. */
export type ConnectionStatus =
  /** Not started, or stopped with `close()`. */
  | "idle"
  /** Getting a ticket or opening the first socket. */
  | "connecting"
  /** Open and receiving. */
  | "open"
  /** Lost; waiting (`retryInMs`) or opening again. */
  | "reconnecting"
  /** Given up: the ticket provider refused (e.g. 401/403/404). */
  | "failed"
  | "closed";

export interface ConnectionState {
  status: ConnectionStatus;
  /** Reconnect attempts since the last open socket. */
  attempt: number;
  /** The close code of the last socket, if any. */
  code?: number;
  reason?: string;
  /** The WebSocket base the socket uses (`ws://host:port`). */
  url?: string;
  /** Milliseconds until the next attempt, while reconnecting. */
  retryInMs?: number;
  /** Why it failed, for `failed`. */
  error?: string;
}

/** The minimal WebSocket the client needs: the browser's, Node 22's global, or the `ws` package's. */
export interface SocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export type SocketFactory = (url: string) => SocketLike;
