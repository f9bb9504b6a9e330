// One chat over the runtime's WebSocket: a ticket from the broker (or the app's back-end), a
// socket to any replica that resumes with `after` and `epoch`, reconnects with backoff and jitter,
// refreshes the ticket on 1008, and hands out the chat's events in order, exactly once.

import { type BackoffOptions, backoffDelay } from "./backoff.js";
import { ApiError, type ApiOptions, brokerTickets, fetchTranscript, type TokenSource } from "./broker.js";
import { Emitter } from "./emitter.js";
import { randomId } from "./ids.js";
import type {
  AckData,
  AgentDelta,
  ConnectionState,
  ErrorData,
  EventFrame,
  ResyncData,
  ServerFrame,
  SocketFactory,
  SocketLike,
  Ticket,
  TicketProvider,
  TicketRequest,
} from "./types.js";
import { type ChatView, Transcript } from "./view.js";

/** Close codes of the runtime (DESIGN.md §4). */
export const CloseCode = {
  Normal: 1000,
  Abnormal: 1006,
  /** The runtime token expired: get a fresh ticket, reconnect with `after`. */
  Policy: 1008,
  TooBig: 1009,
  Internal: 1011,
  /** The replica is draining: reconnect anywhere with `after`. */
  Restart: 1012,
  /** Slow consumer or log unavailable: reconnect with `after`. */
  TryAgain: 1013,
  /** Closed by this client: a gap in the seqs (reconnect with `after`). */
  Gap: 4000,
  /** Closed by this client: no frame (not even a pong) for too long. */
  Silent: 4001,
} as const;

/** Longest text of a user message, in UTF-8 bytes (the gateway refuses longer). */
export const MAX_TEXT_BYTES = 32 * 1024;
/** Longest frame the gateway accepts by default, in bytes. */
export const MAX_FRAME_BYTES = 64 * 1024;

export interface ChatClientOptions {
  appId: string;
  workflowName: string;
  /** Resume this chat (else the first ticket starts a new one). */
  chatId?: string;
  /** Context variables of a new chat. */
  context?: Record<string, unknown>;
  /** The API (broker) base URL, one or several, for tickets with `token`. */
  apiBaseUrl?: string | string[];
  /** The user's JWT (or a function returning a current one): tickets come from the broker. */
  token?: TokenSource;
  /** Instead of `token`: tickets from the app's back-end (which calls the broker with its API key). */
  getTicket?: TicketProvider;
  /**
   * WebSocket base URL(s) to use instead of the ticket's `ws_url` host: one load-balanced URL
   * (`wss://chat.example.com`) or a list of replicas, tried in turn.
   */
  wsBaseUrl?: string | string[];
  /** Opens a socket (default: `new WebSocket(url)`; on Node 20 pass the `ws` package's). */
  createSocket?: SocketFactory;
  fetch?: typeof fetch;
  backoff?: BackoffOptions;
  /** Random numbers in [0, 1) for jitter (tests pin it). */
  random?: () => number;
  /** Application pings while open, ms (0: none; default 20 000); a socket silent for this plus 10 s is replaced. */
  heartbeatMs?: number;
  /** An unacknowledged message is sent again after this long on the same socket, ms (default 5 000). */
  resendMs?: number;
  /** A ticket expiring within this is refreshed before connecting, ms (default 30 000). */
  refreshBeforeMs?: number;
  /** Gives up when the ticket provider fails this many times in a row with a retryable error (default: never). */
  maxTicketAttempts?: number;
  now?: () => number;
}

export interface ChatClientEvents {
  /** The connection's state changed. */
  state: ConnectionState;
  /** The next durable event, in seq order, never twice. */
  event: EventFrame;
  /** A token delta of a streaming message. */
  delta: AgentDelta;
  /** The derived view changed. */
  view: ChatView;
  /** An `error` frame (the connection stays up). */
  error: ErrorData;
  /** An `ack` frame. */
  ack: AckData;
  /** A `resync` frame. */
  resync: ResyncData;
  /** A `notification` frame's data. */
  notification: unknown;
  /** A new ticket. */
  ticket: Ticket;
  /** Every frame as received (before ordering). */
  frame: ServerFrame;
}

interface Outgoing {
  id: string;
  text: string;
  acked: boolean;
  sentAt: number;
}

interface Response {
  requestId: string;
  text: string;
  acked: boolean;
}

const OPEN = 1;

/** Counters that tests and dashboards read. */
export interface ChatClientStats {
  /** Durable frames dropped because their seq was already applied. */
  duplicates: number;
  /** Gaps seen (the socket was replaced to fill them). */
  gaps: number;
  /** Sockets opened. */
  opens: number;
  /** Tickets obtained. */
  tickets: number;
  /** Messages sent again (reconnect or no acknowledgement). */
  resent: number;
}

/**
 * A chat session. `start()` gets a ticket and connects; the client then keeps the socket up until
 * `close()`: it reconnects after any loss with `after=<last seq>` (to the next replica when given
 * several), and its events and view follow the log exactly once, in order.
 */
export class ChatClient extends Emitter<ChatClientEvents> {
  readonly stats: ChatClientStats = { duplicates: 0, gaps: 0, opens: 0, tickets: 0, resent: 0 };
  private readonly opts: ChatClientOptions;
  private readonly tickets: TicketProvider;
  private readonly transcript = new Transcript();
  private readonly now: () => number;
  private ticket: Ticket | undefined;
  private epoch: string | undefined;
  private chat: string | undefined;
  private socket: SocketLike | undefined;
  private generation = 0;
  private status: ConnectionState = { status: "idle", attempt: 0 };
  private attempt = 0;
  private failedOpens = 0;
  private replica = 0;
  private needTicket: TicketRequest["reason"] | undefined;
  private stopped = true;
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  private heartbeat: ReturnType<typeof setInterval> | undefined;
  private stableTimer: ReturnType<typeof setTimeout> | undefined;
  private lastFrameAt = 0;
  private readonly outbox = new Map<string, Outgoing>();
  private readonly responses = new Map<string, Response>();
  private cancelQueued: string | null | undefined;
  /** Per socket: the commands sent, oldest first, matched to `ack` frames. */
  private inflight: { "user.message": string[]; "input.response": string[]; cancel: string[] } = {
    "user.message": [],
    "input.response": [],
    cancel: [],
  };

  constructor(opts: ChatClientOptions) {
    super();
    this.opts = opts;
    this.now = opts.now ?? Date.now;
    this.chat = opts.chatId;
    if (opts.getTicket) {
      this.tickets = opts.getTicket;
    } else if (opts.token !== undefined && opts.apiBaseUrl !== undefined) {
      this.tickets = brokerTickets(this.api() as ApiOptions);
    } else {
      throw new Error("ChatClient needs getTicket, or token and apiBaseUrl");
    }
  }

  /** The chat's id once known. */
  get chatId(): string | undefined {
    return this.chat;
  }

  /** The last seq applied. */
  get lastSeq(): number {
    return this.transcript.lastSeq;
  }

  get view(): ChatView {
    return this.transcript.view;
  }

  get state(): ConnectionState {
    return this.status;
  }

  /** Every durable event applied, in order. */
  get log(): readonly EventFrame[] {
    return this.transcript.log;
  }

  /**
   * Gets the first ticket (retrying while the provider is unavailable) and connects; resolves
   * with the chat id once a ticket is there, rejects when the provider refuses (401, 403, 404…)
   * or `close()` is called first.
   */
  start(): Promise<string> {
    if (!this.stopped && this.chat) return Promise.resolve(this.chat);
    const first = new Promise<string>((resolve, reject) => {
      const offTicket = this.on("ticket", (t) => {
        offTicket();
        offState();
        resolve(t.chat_id);
      });
      const offState = this.on("state", (s) => {
        if (s.status === "failed" || s.status === "closed") {
          offTicket();
          offState();
          reject(new Error(s.error ?? `chat ${s.status}`));
        }
      });
    });
    if (this.stopped) {
      this.stopped = false;
      this.setState({ status: "connecting", attempt: 0 });
      void this.connect();
    }
    return first;
  }

  /** Stops: closes the socket and every timer. Pending messages stay pending. */
  close(): void {
    this.stopped = true;
    this.clearTimers();
    const s = this.socket;
    this.socket = undefined;
    this.generation++;
    if (s) s.close(CloseCode.Normal, "client closed");
    this.setState({ status: "closed", attempt: 0 });
  }

  /**
   * Sends a user message; returns its `client_msg_id`. It is shown at once, sent now or as soon
   * as a socket is open, and sent again until acknowledged (the id makes repeats harmless).
   */
  sendMessage(text: string, clientMsgId: string = randomId()): string {
    if (text.trim() === "") throw new Error("empty message");
    if (new TextEncoder().encode(text).length > MAX_TEXT_BYTES) {
      throw new Error(`message longer than ${MAX_TEXT_BYTES} bytes`);
    }
    // The gateway closes a socket on a frame over 64 KiB (1009): such a frame would be resent forever.
    const frame = JSON.stringify({ type: "user.message", text, client_msg_id: clientMsgId });
    if (new TextEncoder().encode(frame).length > MAX_FRAME_BYTES) {
      throw new Error(`message frame longer than ${MAX_FRAME_BYTES} bytes`);
    }
    if (this.outbox.has(clientMsgId)) return clientMsgId;
    const out: Outgoing = { id: clientMsgId, text, acked: false, sentAt: 0 };
    this.outbox.set(clientMsgId, out);
    this.emit("view", this.transcript.addPending(clientMsgId, text));
    this.sendOutgoing(out);
    return clientMsgId;
  }

  /** Answers an `input.requested`; sent again after a reconnect until acknowledged. */
  respond(requestId: string, text: string): void {
    if (text.trim() === "") throw new Error("empty answer");
    const r: Response = { requestId, text, acked: false };
    this.responses.set(requestId, r);
    this.sendResponse(r);
  }

  /** Cancels the run in progress (sent when a socket is open). */
  cancel(reason?: string): void {
    this.cancelQueued = reason ?? null;
    this.flushCancel();
  }

  // --- connection -------------------------------------------------------------------------

  private api(): ApiOptions | undefined {
    if (this.opts.token === undefined || this.opts.apiBaseUrl === undefined) return undefined;
    return {
      baseUrl: this.opts.apiBaseUrl,
      token: this.opts.token,
      ...(this.opts.fetch ? { fetch: this.opts.fetch } : {}),
    };
  }

  private setState(s: ConnectionState): void {
    this.status = s;
    this.emit("state", s);
  }

  private clearTimers(): void {
    if (this.retryTimer) clearTimeout(this.retryTimer);
    if (this.heartbeat) clearInterval(this.heartbeat);
    if (this.stableTimer) clearTimeout(this.stableTimer);
    this.retryTimer = this.heartbeat = this.stableTimer = undefined;
  }

  private ticketDue(): TicketRequest["reason"] | undefined {
    if (!this.ticket) return "start";
    if (this.needTicket) return this.needTicket;
    const exp = Date.parse(this.ticket.expires_at);
    if (Number.isFinite(exp) && exp - this.now() < (this.opts.refreshBeforeMs ?? 30_000)) return "expired";
    return undefined;
  }

  private async connect(): Promise<void> {
    if (this.stopped) return;
    const reason = this.ticketDue();
    if (reason) {
      try {
        const t = await this.tickets({
          appId: this.opts.appId,
          workflowName: this.opts.workflowName,
          ...(this.chat ? { chatId: this.chat } : {}),
          ...(this.opts.context ? { context: this.opts.context } : {}),
          reason,
        });
        if (this.stopped) return;
        this.ticket = t;
        this.chat = t.chat_id;
        this.epoch ??= t.epoch;
        this.needTicket = undefined;
        this.failedOpens = 0;
        this.stats.tickets++;
        this.emit("ticket", t);
      } catch (e) {
        if (this.stopped) return;
        const retryable = !(e instanceof ApiError) || e.retryable;
        this.attempt++;
        const max = this.opts.maxTicketAttempts;
        if (!retryable || (max !== undefined && this.attempt >= max)) {
          this.clearTimers();
          this.setState({ status: "failed", attempt: this.attempt, error: String((e as Error).message ?? e) });
          return;
        }
        this.schedule(String((e as Error).message ?? e));
        return;
      }
    }
    this.open();
  }

  private socketUrl(t: Ticket): string {
    let url = t.ws_url;
    const bases = this.opts.wsBaseUrl;
    if (bases !== undefined) {
      const list = Array.isArray(bases) ? bases : [bases];
      const base = list[this.replica % list.length] ?? "";
      const path = url.replace(/^wss?:\/\/[^/]+/, "");
      url = base.replace(/\/+$/, "") + path;
    }
    const q = new URLSearchParams({ token: t.runtime_token, after: String(this.transcript.lastSeq) });
    if (this.epoch) q.set("epoch", this.epoch);
    return `${url}?${q.toString()}`;
  }

  private open(): void {
    const t = this.ticket;
    if (!t || this.stopped) return;
    const url = this.socketUrl(t);
    const gen = ++this.generation;
    const create: SocketFactory =
      this.opts.createSocket ??
      ((u) => new (globalThis as unknown as { WebSocket: new (u: string) => SocketLike }).WebSocket(u));
    let s: SocketLike;
    try {
      s = create(url);
    } catch (e) {
      this.failedOpens++;
      this.attempt++;
      this.schedule(String(e));
      return;
    }
    this.socket = s;
    const shown = url.replace(/\/ws\/.*$/, "");
    let opened = false;
    s.onopen = () => {
      if (gen !== this.generation) return;
      opened = true;
      this.failedOpens = 0;
      this.stats.opens++;
      this.lastFrameAt = this.now();
      this.inflight = { "user.message": [], "input.response": [], cancel: [] };
      this.setState({ status: "open", attempt: this.attempt, url: shown });
      // Backoff starts over once the socket has stayed up for a while.
      this.stableTimer = setTimeout(() => {
        if (gen === this.generation) this.attempt = 0;
      }, 5_000);
      this.startHeartbeat(gen);
      this.flushAll();
    };
    s.onmessage = (ev) => {
      if (gen !== this.generation) return;
      this.lastFrameAt = this.now();
      if (typeof ev.data !== "string") return;
      let frame: ServerFrame;
      try {
        frame = JSON.parse(ev.data) as ServerFrame;
      } catch {
        return;
      }
      this.onFrame(frame);
    };
    s.onerror = () => {};
    s.onclose = (ev) => {
      if (gen !== this.generation) return;
      this.socket = undefined;
      if (this.heartbeat) clearInterval(this.heartbeat);
      if (this.stableTimer) clearTimeout(this.stableTimer);
      this.heartbeat = this.stableTimer = undefined;
      if (this.stopped) return;
      this.onClosed(ev.code, ev.reason, opened);
    };
  }

  private onClosed(code: number, reason: string, opened: boolean): void {
    const list = this.opts.wsBaseUrl;
    if (Array.isArray(list) && list.length > 1) this.replica++;
    if (!opened) {
      this.failedOpens++;
      // A socket refused before opening (the browser does not say why): after two, the ticket
      // itself may be the reason (expired, revoked), so get a fresh one.
      if (this.failedOpens >= 2) this.needTicket = "refused";
    }
    if (code === CloseCode.Policy) this.needTicket = "expired";
    this.attempt++;
    // A draining replica or an expired token: come back at once (with jitter) rather than after a backoff.
    const quick = code === CloseCode.Restart || code === CloseCode.Policy || code === CloseCode.Gap;
    this.schedule(reason, code, quick ? Math.round(100 * (this.opts.random ?? Math.random)()) : undefined);
  }

  private schedule(reason: string, code?: number, delay?: number): void {
    if (this.stopped) return;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    const ms = delay ?? backoffDelay(this.attempt, this.opts.backoff, this.opts.random);
    this.setState({
      status: "reconnecting",
      attempt: this.attempt,
      ...(code !== undefined ? { code } : {}),
      reason,
      retryInMs: ms,
    });
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      void this.connect();
    }, ms);
  }

  /** Replaces the socket (a gap, silence): reconnect with `after`. */
  private replace(code: number, reason: string): void {
    const s = this.socket;
    this.socket = undefined;
    this.generation++;
    if (s) {
      try {
        s.close(code, reason);
      } catch {
        // already closed
      }
    }
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = undefined;
    this.onClosed(code, reason, true);
  }

  private startHeartbeat(gen: number): void {
    const every = this.opts.heartbeatMs ?? 20_000;
    if (every <= 0) return;
    this.heartbeat = setInterval(() => {
      if (gen !== this.generation) return;
      if (this.now() - this.lastFrameAt > every + 10_000) {
        this.replace(CloseCode.Silent, "no frame from the server");
        return;
      }
      this.sendRaw({ type: "ping" });
      // Unacknowledged messages on this socket are sent again (the id makes repeats harmless).
      this.flushOutbox(this.opts.resendMs ?? 5_000);
    }, every);
  }

  // --- frames ---------------------------------------------------------------------------------

  private onFrame(f: ServerFrame): void {
    this.emit("frame", f);
    if (f.seq !== null && f.seq !== undefined) {
      this.onEvent(f as EventFrame);
      return;
    }
    switch (f.type) {
      case "agent.delta": {
        const v = this.transcript.applyDelta(f.data);
        if (v) {
          this.emit("delta", f.data);
          this.emit("view", v);
        }
        break;
      }
      case "ack":
        this.onAck(f.data);
        break;
      case "error":
        this.emit("error", f.data);
        if (f.data.code === "unavailable") {
          // The gateway could not accept a frame: try the unacknowledged ones again shortly.
          setTimeout(() => this.flushAll(), 500 + Math.round(500 * (this.opts.random ?? Math.random)()));
        }
        break;
      case "resync":
        this.onResync(f.data);
        break;
      case "notification":
        this.emit("notification", f.data);
        break;
      default:
        break;
    }
  }

  private onEvent(e: EventFrame): void {
    const last = this.transcript.lastSeq;
    if (e.seq <= last) {
      this.stats.duplicates++;
      return;
    }
    if (e.seq > last + 1) {
      // The gateway never skips; a gap means something went wrong on the way: fetch it again.
      this.stats.gaps++;
      this.replace(CloseCode.Gap, `gap: got seq ${e.seq} after ${last}`);
      return;
    }
    const v = this.transcript.apply(e);
    if (e.type === "message.user" && e.data.client_msg_id) this.outbox.delete(e.data.client_msg_id);
    if (e.type === "input.received") this.responses.delete(e.data.request_id);
    this.emit("event", e);
    this.emit("view", v);
  }

  private onAck(a: AckData): void {
    const q = this.inflight[a.command];
    const id = q?.shift();
    this.emit("ack", a);
    if (id === undefined) return;
    if (a.command === "user.message") {
      const o = this.outbox.get(id);
      if (o) o.acked = true;
      this.emit("view", this.transcript.markSent(id));
    } else if (a.command === "input.response") {
      const r = this.responses.get(id);
      if (r) r.acked = true;
    }
  }

  private onResync(r: ResyncData): void {
    this.emit("resync", r);
    if (r.reason === "log_recreated") {
      // Our seqs belong to a history that no longer exists; the gateway replays from the start.
      if (r.epoch) this.epoch = r.epoch;
      this.emit("view", this.transcript.reset());
      return;
    }
    if (r.reason === "log_truncated" && typeof r.first_seq === "number") {
      const after = this.transcript.lastSeq;
      const first = r.first_seq;
      // The events between are gone from the log: continue from `first_seq`, and fill the view
      // from the read model when we can read it.
      const api = this.api();
      const chat = this.chat;
      this.emit("view", this.transcript.skipTo(first - 1));
      if (api && chat) {
        fetchTranscript(api, chat, after)
          .then((frames) => {
            const missing = frames.filter((x) => x.seq > after && x.seq < first);
            if (missing.length > 0) this.emit("view", this.transcript.insertHistory(missing));
          })
          .catch(() => {});
      }
    }
  }

  // --- sending --------------------------------------------------------------------------------

  private sendRaw(frame: object): boolean {
    const s = this.socket;
    if (!s || s.readyState !== OPEN) return false;
    try {
      s.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  private sendOutgoing(o: Outgoing): void {
    if (this.sendRaw({ type: "user.message", text: o.text, client_msg_id: o.id })) {
      if (o.sentAt > 0) this.stats.resent++;
      o.sentAt = this.now();
      this.inflight["user.message"].push(o.id);
    }
  }

  private sendResponse(r: Response): void {
    if (this.sendRaw({ type: "input.response", request_id: r.requestId, text: r.text })) {
      this.inflight["input.response"].push(r.requestId);
    }
  }

  private flushCancel(): void {
    if (this.cancelQueued === undefined) return;
    const reason = this.cancelQueued;
    if (this.sendRaw(reason === null ? { type: "cancel" } : { type: "cancel", reason })) {
      this.inflight.cancel.push("cancel");
      this.cancelQueued = undefined;
    }
  }

  /** On a new socket: everything not yet in the log goes again, in the order it was sent. */
  private flushAll(): void {
    for (const o of this.outbox.values()) {
      o.acked = false;
      this.sendOutgoing(o);
    }
    for (const r of this.responses.values()) if (!r.acked) this.sendResponse(r);
    this.flushCancel();
  }

  /** On the same socket: messages without an acknowledgement after `olderThan` ms go again. */
  private flushOutbox(olderThan: number): void {
    const now = this.now();
    for (const o of this.outbox.values()) {
      if (!o.acked && now - o.sentAt >= olderThan) this.sendOutgoing(o);
    }
  }
}
