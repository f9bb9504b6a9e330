// A fake WebSocket and ticket provider: the client's unit tests drive every socket by hand.

import type { SocketLike, Ticket, TicketRequest } from "../src/index.js";

export class FakeSocket implements SocketLike {
  readyState = 0;
  sent: Record<string, unknown>[] = [];
  closedWith: { code?: number; reason?: string } | undefined;
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;

  constructor(readonly url: string) {}

  get params(): URLSearchParams {
    return new URL(this.url).searchParams;
  }

  get base(): string {
    return this.url.replace(/\/ws\/.*$/, "");
  }

  send(data: string): void {
    if (this.readyState !== 1) throw new Error("not open");
    this.sent.push(JSON.parse(data) as Record<string, unknown>);
  }

  close(code?: number, reason?: string): void {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }

  // --- the server's side
  open(): void {
    this.readyState = 1;
    this.onopen?.({});
  }

  frame(f: object): void {
    this.onmessage?.({ data: JSON.stringify(f) });
  }

  event(seq: number, type: string, data: object = {}): void {
    this.frame({ id: `e${seq}`, seq, type, ts: "2026-12-07T00:00:00Z", data });
  }

  ephemeral(type: string, data: object): void {
    this.frame({ id: `x-${type}`, seq: null, type, ts: "2026-12-07T00:00:00Z", data });
  }

  serverClose(code: number, reason = ""): void {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  /** Frames of one type the client sent. */
  sentOf(type: string): Record<string, unknown>[] {
    return this.sent.filter((f) => f.type === type);
  }
}

export class Sockets {
  all: FakeSocket[] = [];
  create = (url: string): FakeSocket => {
    const s = new FakeSocket(url);
    this.all.push(s);
    return s;
  };
  get last(): FakeSocket {
    const s = this.all.at(-1);
    if (!s) throw new Error("no socket opened yet");
    return s;
  }
}

/** A ticket provider that records its calls and mints tokens t1, t2, … */
export class Tickets {
  calls: TicketRequest[] = [];
  epoch = "ep1";
  expiresInMs = 15 * 60_000;
  fail: Error | undefined;
  provider = async (req: TicketRequest): Promise<Ticket> => {
    this.calls.push(req);
    if (this.fail) throw this.fail;
    const n = this.calls.length;
    return {
      chat_id: req.chatId ?? "chat1",
      ws_url: `ws://gw.example/ws/${req.workflowName}/${req.appId}/${req.chatId ?? "chat1"}/alice`,
      runtime_token: `t${n}`,
      expires_at: new Date(Date.now() + this.expiresInMs).toISOString(),
      app_id: req.appId,
      workflow_name: req.workflowName,
      resumed: req.chatId !== undefined,
      last_seq: 0,
      epoch: this.epoch,
    };
  };
}
