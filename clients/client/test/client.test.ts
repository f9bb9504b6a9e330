import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { ApiError, backoffDelay, brokerTickets, ChatClient, type ConnectionState, DeltaText } from "../src/index.js";
import { type FakeSocket, Sockets, Tickets } from "./fake.js";

const RUN = "0190-run";

function setup(extra: Partial<ConstructorParameters<typeof ChatClient>[0]> = {}) {
  const sockets = new Sockets();
  const tickets = new Tickets();
  const client = new ChatClient({
    appId: "default",
    workflowName: "hello",
    getTicket: tickets.provider,
    createSocket: sockets.create,
    random: () => 0.5,
    heartbeatMs: 0,
    ...extra,
  });
  const states: ConnectionState[] = [];
  client.on("state", (s) => states.push(s));
  return { client, sockets, tickets, states };
}

/** Lets the ticket promise and timers run. */
async function settle(ms = 0) {
  await vi.advanceTimersByTimeAsync(ms);
}

async function started(extra: Partial<ConstructorParameters<typeof ChatClient>[0]> = {}) {
  const t = setup(extra);
  await t.client.start();
  t.sockets.last.open();
  return t;
}

function seqs(client: ChatClient) {
  return client.log.map((e) => e.seq);
}

beforeEach(() => {
  vi.useFakeTimers();
});
afterEach(() => {
  vi.useRealTimers();
});

describe("start and resume", () => {
  it("gets a ticket, connects with after=0 and the ticket's epoch, applies events in order", async () => {
    const { client, sockets, tickets, states } = await started();
    expect(tickets.calls).toEqual([{ appId: "default", workflowName: "hello", reason: "start" }]);
    const s = sockets.last;
    expect(s.base).toBe("ws://gw.example");
    expect(s.params.get("token")).toBe("t1");
    expect(s.params.get("after")).toBe("0");
    expect(s.params.get("epoch")).toBe("ep1");
    expect(states.map((x) => x.status)).toEqual(["connecting", "open"]);
    s.event(1, "session.started");
    s.event(2, "message.user", { text: "hi" });
    expect(seqs(client)).toEqual([1, 2]);
    expect(client.chatId).toBe("chat1");
  });

  it("drops duplicates and resumes after an abnormal close with after=<last seq>, backing off with jitter", async () => {
    const { client, sockets, states } = await started();
    const first = sockets.last;
    first.event(1, "session.started");
    first.event(2, "message.user", { text: "hi" });
    first.event(2, "message.user", { text: "hi" });
    expect(client.stats.duplicates).toBe(1);
    first.serverClose(1006);
    const waiting = states.at(-1)!;
    expect(waiting.status).toBe("reconnecting");
    // attempt 1, initial 250 ms, jitter 0.5 with random 0.5: 125 + 62.5
    expect(waiting.retryInMs).toBe(backoffDelay(1, {}, () => 0.5));
    expect(sockets.all).toHaveLength(1);
    await settle(waiting.retryInMs!);
    const second = sockets.last;
    expect(second).not.toBe(first);
    expect(second.params.get("after")).toBe("2");
    expect(second.params.get("token")).toBe("t1");
    second.open();
    // The replica replays what it thinks is new; anything already seen is dropped.
    second.event(2, "message.user", { text: "hi" });
    second.event(3, "run.started", { run_id: RUN, trigger_seq: 2 });
    expect(seqs(client)).toEqual([1, 2, 3]);
    expect(client.stats.duplicates).toBe(2);
  });

  it("backs off further after each failed attempt, up to the cap, and starts over once a socket stays up", async () => {
    const { sockets, states } = await started({ backoff: { initialMs: 100, maxMs: 1000, jitter: 0 } });
    const delays: number[] = [];
    for (let i = 0; i < 6; i++) {
      sockets.last.serverClose(1006);
      delays.push(states.at(-1)!.retryInMs!);
      await settle(states.at(-1)!.retryInMs!);
    }
    // The first loss came after an open socket; the others never opened.
    expect(delays).toEqual([100, 200, 400, 800, 1000, 1000]);
    sockets.last.open();
    await settle(5_000);
    sockets.last.serverClose(1006);
    expect(states.at(-1)!.retryInMs).toBe(100);
  });

  it("rotates through a list of replicas", async () => {
    const { sockets } = await started({ wsBaseUrl: ["ws://a:1", "ws://b:2/"] });
    expect(sockets.last.base).toBe("ws://a:1");
    sockets.last.serverClose(1006);
    await settle(10_000);
    expect(sockets.last.base).toBe("ws://b:2");
    expect(sockets.last.url).toContain("/ws/hello/default/chat1/alice?");
    sockets.last.serverClose(1006);
    await settle(10_000);
    expect(sockets.last.base).toBe("ws://a:1");
  });

  it("reconnects at once on 1012 (draining) and with backoff on 1013 (slow consumer)", async () => {
    const { sockets, states } = await started({ backoff: { initialMs: 1000, jitter: 0 } });
    sockets.last.serverClose(1012, "server restarting; reconnect with after");
    expect(states.at(-1)!.retryInMs!).toBeLessThanOrEqual(100);
    expect(states.at(-1)!.code).toBe(1012);
    await settle(100);
    expect(sockets.all).toHaveLength(2);
    sockets.last.open();
    await settle(5_000);
    sockets.last.serverClose(1013, "slow consumer");
    expect(states.at(-1)!.retryInMs).toBe(1000);
  });

  it("replaces the socket on a gap in the seqs and resumes from the last seq it has", async () => {
    const { client, sockets } = await started();
    const s = sockets.last;
    s.event(1, "session.started");
    s.event(3, "run.started", { run_id: RUN, trigger_seq: 2 });
    expect(client.stats.gaps).toBe(1);
    expect(s.closedWith?.code).toBe(4000);
    expect(seqs(client)).toEqual([1]);
    await settle(100);
    expect(sockets.last.params.get("after")).toBe("1");
  });

  it("stops for good when the ticket provider refuses (401/403/404)", async () => {
    const { client, tickets, states } = setup();
    tickets.fail = new ApiError(403, "workflow_not_allowed", "no", false);
    await expect(client.start()).rejects.toThrow(/no/);
    expect(states.at(-1)!.status).toBe("failed");
  });

  it("retries the ticket provider with backoff while it is unavailable", async () => {
    const { client, sockets, tickets } = setup({ backoff: { initialMs: 100, jitter: 0 } });
    tickets.fail = new ApiError(503, "unavailable", "down", true);
    let chat: string | undefined;
    const start = client.start().then((id) => {
      chat = id;
    });
    await settle(0);
    expect(client.state.status).toBe("reconnecting");
    expect(chat).toBeUndefined();
    tickets.fail = undefined;
    await settle(100);
    await start;
    expect(chat).toBe("chat1");
    expect(tickets.calls).toHaveLength(2);
    expect(sockets.all).toHaveLength(1);
  });
});

describe("tokens", () => {
  it("on 1008 asks the ticket provider for a fresh ticket and resumes with it", async () => {
    const { client, sockets, tickets } = await started();
    sockets.last.event(1, "session.started");
    sockets.last.serverClose(1008, "token expired; get a fresh token and reconnect with after");
    await settle(100);
    expect(tickets.calls.map((c) => c.reason)).toEqual(["start", "expired"]);
    expect(tickets.calls[1]!.chatId).toBe("chat1");
    expect(sockets.last.params.get("token")).toBe("t2");
    expect(sockets.last.params.get("after")).toBe("1");
    expect(client.stats.tickets).toBe(2);
  });

  it("refreshes a ticket that expires soon before connecting, and one whose sockets keep failing to open", async () => {
    const { sockets, tickets } = await started();
    tickets.expiresInMs = 10_000; // the next ticket is nearly expired already
    sockets.last.serverClose(1006);
    await settle(10_000);
    expect(tickets.calls.map((c) => c.reason)).toEqual(["start"]);
    // Never opened twice: the ticket may be the reason.
    sockets.last.serverClose(1006);
    await settle(10_000);
    sockets.last.serverClose(1006);
    await settle(10_000);
    expect(tickets.calls.map((c) => c.reason)).toEqual(["start", "refused"]);
    // That ticket expires within 30 s: the next connect gets another first.
    sockets.last.serverClose(1006);
    await settle(10_000);
    expect(tickets.calls.map((c) => c.reason)).toEqual(["start", "refused", "expired"]);
  });
});

describe("resync", () => {
  it("log_recreated: forgets the old history, takes the new epoch and accepts the replay from 1", async () => {
    const { client, sockets } = await started();
    const s = sockets.last;
    s.event(1, "session.started");
    s.event(2, "message.user", { text: "old" });
    s.ephemeral("resync", { reason: "log_recreated", epoch: "ep2" });
    expect(client.lastSeq).toBe(0);
    s.event(1, "session.started");
    expect(seqs(client)).toEqual([1]);
    s.serverClose(1006);
    await settle(10_000);
    expect(sockets.last.params.get("epoch")).toBe("ep2");
    expect(sockets.last.params.get("after")).toBe("1");
  });

  it("log_truncated: continues from first_seq without calling it a gap", async () => {
    const { client, sockets } = await started();
    const s = sockets.last;
    const resyncs: unknown[] = [];
    client.on("resync", (r) => resyncs.push(r));
    s.event(1, "session.started");
    s.ephemeral("resync", { reason: "log_truncated", after: 1, first_seq: 5 });
    s.event(5, "message.user", { text: "later" });
    expect(client.stats.gaps).toBe(0);
    expect(client.lastSeq).toBe(5);
    expect(resyncs).toHaveLength(1);
  });
});

describe("resync from the read model", () => {
  it("log_truncated with a user token: the missing messages are read from the transcript endpoint", async () => {
    const requested: string[] = [];
    const fetch = (async (url: string) => {
      requested.push(url);
      const messages = [
        { seq: 2, id: "e2", type: "message.user", ts: "t", data: { text: "kept by the read model" } },
        { seq: 3, id: "e3", type: "agent.message", ts: "t", data: { run_id: RUN, step: 1, agent: "a", text: "hi" } },
        { seq: 5, id: "e5", type: "message.user", ts: "t", data: { text: "already live" } },
      ];
      return new Response(JSON.stringify({ chat_id: "chat1", last_seq: 5, messages }), { status: 200 });
    }) as unknown as typeof globalThis.fetch;
    const { client, sockets } = await started({ apiBaseUrl: "http://api", token: "jwt", fetch });
    const s = sockets.last;
    s.event(1, "session.started");
    s.ephemeral("resync", { reason: "log_truncated", after: 1, first_seq: 4 });
    s.event(4, "run.started", { run_id: RUN, trigger_seq: 2 });
    await settle(0);
    expect(requested).toEqual(["http://api/api/sessions/chat1/messages?after=1&limit=1000"]);
    expect(seqs(client)).toEqual([1, 2, 3, 4]);
    expect(client.view.items.map((i) => i.kind)).toEqual(["user", "assistant"]);
    s.event(5, "message.user", { text: "already live" });
    expect(client.lastSeq).toBe(5);
  });
});

describe("streamed text", () => {
  it("assembles deltas by UTF-8 byte offset and replaces them with the agent.message", async () => {
    const { client, sockets } = await started();
    const s = sockets.last;
    const d = (offset: number, text: string, round = 1) =>
      s.ephemeral("agent.delta", { run_id: RUN, step: 1, round, agent: "assistant", offset, text });
    s.event(1, "run.started", { run_id: RUN, trigger_seq: 0 });
    d(0, "Grüß");
    d(6, " dich"); // "Grüß" is 6 bytes
    const draft = client.view.items.at(-1)!;
    expect(draft).toMatchObject({ kind: "assistant", streaming: true, text: "Grüß dich" });
    // A model call retried from the start restarts at 0 and replaces the text.
    d(0, "Hallo");
    expect(client.view.items.at(-1)).toMatchObject({ text: "Hallo", streaming: true });
    // Overlapping: rewrite the tail.
    d(3, "p!");
    expect(client.view.items.at(-1)).toMatchObject({ text: "Halp!" });
    s.event(2, "model.replied", { run_id: RUN, step: 1, round: 1 });
    s.event(3, "agent.message", { run_id: RUN, step: 1, agent: "assistant", text: "Halp! (final)" });
    const items = client.view.items.filter((i) => i.kind === "assistant");
    expect(items).toHaveLength(1);
    expect(items[0]).toMatchObject({ seq: 3, streaming: false, text: "Halp! (final)" });
    // A late delta of that message is stale.
    d(13, " more");
    expect(client.view.items.filter((i) => i.kind === "assistant")).toHaveLength(1);
    // The next round streams anew.
    d(0, "Round two", 2);
    expect(client.view.items.at(-1)).toMatchObject({ streaming: true, text: "Round two" });
  });

  it("a delta joining mid-message is shown as partial; a cut multi-byte character waits for its rest", () => {
    const t = new DeltaText();
    t.apply(10, "tail");
    expect(t.partial).toBe(true);
    expect(t.text).toBe("tail");
    const u = new DeltaText();
    const bytes = new TextEncoder().encode("ü");
    u.apply(0, "a");
    expect(u.text).toBe("a");
    expect(bytes.length).toBe(2);
    u.apply(1, "ü");
    expect(u.text).toBe("aü");
    expect(u.length).toBe(3);
  });

  it("drops a run's unfinished drafts when the run ends", async () => {
    const { client, sockets } = await started();
    const s = sockets.last;
    s.ephemeral("agent.delta", { run_id: RUN, step: 1, round: 1, agent: "a", offset: 0, text: "par" });
    s.event(1, "run.failed", { run_id: RUN, code: "model_unavailable", reason: "down" });
    expect(client.view.items.map((i) => i.kind)).toEqual(["notice"]);
    expect(client.view.run).toMatchObject({ status: "failed", error: { code: "model_unavailable" } });
  });
});

describe("sending", () => {
  it("shows a message at once, sends it when open, resends it on reconnect until the log has it", async () => {
    const { client, sockets } = setup();
    await client.start();
    const id = client.sendMessage("hello");
    expect(client.view.items).toMatchObject([{ kind: "user", text: "hello", status: "sending", clientMsgId: id }]);
    const s1 = sockets.last;
    expect(s1.sent).toEqual([]);
    s1.open();
    expect(s1.sentOf("user.message")).toEqual([{ type: "user.message", text: "hello", client_msg_id: id }]);
    // Lost before any answer: the next socket sends it again, with the same id.
    s1.serverClose(1006);
    await settle(10_000);
    const s2 = sockets.last;
    s2.open();
    expect(s2.sentOf("user.message")).toEqual([{ type: "user.message", text: "hello", client_msg_id: id }]);
    s2.ephemeral("ack", { command: "user.message", command_id: "c1" });
    expect(client.view.items[0]).toMatchObject({ status: "sent" });
    s2.event(1, "session.started");
    s2.event(2, "message.user", { text: "hello", client_msg_id: id });
    expect(client.view.items).toMatchObject([{ kind: "user", seq: 2, status: "delivered" }]);
    expect(client.view.items).toHaveLength(1);
    // In the log: never sent again.
    s2.serverClose(1006);
    await settle(10_000);
    sockets.last.open();
    expect(sockets.last.sentOf("user.message")).toEqual([]);
    expect(client.stats.resent).toBe(1);
  });

  it("resends an unacknowledged message on the same socket after resendMs", async () => {
    const { client, sockets } = await started({ heartbeatMs: 1000, resendMs: 2000 });
    const id = client.sendMessage("are you there");
    const s = sockets.last;
    await settle(1000);
    expect(s.sentOf("user.message")).toHaveLength(1);
    expect(s.sentOf("ping")).toHaveLength(1);
    s.ephemeral("pong", {});
    await settle(1000);
    expect(s.sentOf("user.message")).toHaveLength(2);
    s.ephemeral("ack", { command: "user.message", command_id: "c1" });
    await settle(3000);
    expect(s.sentOf("user.message").map((f) => f.client_msg_id)).toEqual([id, id]);
  });

  it("replaces a socket that stays silent past the heartbeat", async () => {
    const { sockets } = await started({ heartbeatMs: 1000 });
    const s = sockets.last;
    await settle(12_000);
    expect(s.closedWith?.code).toBe(4001);
    await settle(200);
    expect(sockets.all.length).toBeGreaterThan(1);
  });

  it("respond and cancel send their frames; a response is sent again after a reconnect until acknowledged", async () => {
    const { client, sockets } = await started();
    const s = sockets.last;
    s.event(1, "input.requested", { run_id: RUN, request_id: "r1", prompt: "Order number?" });
    expect(client.view.run).toMatchObject({ status: "waiting_input", waitingFor: { requestId: "r1" } });
    client.respond("r1", "A-100");
    expect(s.sentOf("input.response")).toEqual([{ type: "input.response", request_id: "r1", text: "A-100" }]);
    s.serverClose(1006);
    await settle(10_000);
    const s2 = sockets.last;
    s2.open();
    expect(s2.sentOf("input.response")).toHaveLength(1);
    s2.ephemeral("ack", { command: "input.response", command_id: "c2" });
    s2.event(2, "input.received", { run_id: RUN, request_id: "r1", text: "A-100" });
    expect(client.view.items[0]).toMatchObject({ kind: "input", answer: "A-100", answerSeq: 2 });
    client.cancel("enough");
    expect(s2.sentOf("cancel")).toEqual([{ type: "cancel", reason: "enough" }]);
  });

  it("refuses an empty or oversized message", async () => {
    const { client } = await started();
    expect(() => client.sendMessage("  ")).toThrow();
    expect(() => client.sendMessage("x".repeat(32 * 1024 + 1))).toThrow();
    // Within 32 KiB of text, but over 64 KiB once escaped in JSON.
    expect(() => client.sendMessage("\u0001".repeat(12 * 1024))).toThrow(/frame/);
  });
});

describe("view", () => {
  it("folds tool calls, input requests, children and run status", async () => {
    const { client, sockets } = await started();
    const s = sockets.last;
    s.event(1, "message.user", { text: "research boats" });
    s.event(2, "run.started", { run_id: RUN, trigger_seq: 1 });
    s.event(3, "step.started", { run_id: RUN, step: 1, agent: "coordinator" });
    s.event(4, "tool.call", { run_id: RUN, step: 1, call_id: "k1", tool: "classify", arguments: { text: "x" } });
    s.event(5, "tool.result", { run_id: RUN, step: 1, call_id: "k1", tool: "classify", result: "general" });
    s.event(6, "context.updated", { run_id: RUN, key: "category", value: "general" });
    s.event(7, "child.spawned", { run_id: RUN, child_chat_id: "c-a", workflow: "w", step: 1, index: 0, input: "a" });
    s.event(8, "child.spawned", { run_id: RUN, child_chat_id: "c-b", workflow: "w", step: 1, index: 1, input: "b" });
    expect(client.view.run.status).toBe("waiting_children");
    s.event(9, "child.completed", { run_id: RUN, child_chat_id: "c-b", step: 1, index: 1, status: "completed" });
    s.event(10, "run.completed", { run_id: RUN, steps: 1 });
    const v = client.view;
    expect(v.items.map((i) => i.kind)).toEqual(["user", "tool", "children"]);
    expect(v.items[1]).toMatchObject({ done: true, result: "general", resultSeq: 5 });
    expect(v.items[2]).toMatchObject({
      children: [
        { childChatId: "c-a", status: "running" },
        { childChatId: "c-b", status: "completed" },
      ],
    });
    expect(v.context).toEqual({ category: "general" });
    expect(v.run.status).toBe("completed");
  });
});

describe("broker", () => {
  it("posts to /api/sessions with the user's token and tries the next base URL when one is down", async () => {
    const calls: { url: string; init: RequestInit }[] = [];
    const fetch = (async (url: string, init: RequestInit) => {
      calls.push({ url, init });
      if (url.startsWith("http://down")) throw new TypeError("connection refused");
      return new Response(JSON.stringify({ chat_id: "c9", runtime_token: "rt" }), { status: 201 });
    }) as unknown as typeof globalThis.fetch;
    const provider = brokerTickets({ baseUrl: ["http://down", "http://up/"], token: () => "jwt", fetch });
    const t = await provider({ appId: "default", workflowName: "hello", chatId: "c9", reason: "expired" });
    expect(t.chat_id).toBe("c9");
    expect(calls.map((c) => c.url)).toEqual(["http://down/api/sessions", "http://up/api/sessions"]);
    expect(calls[1]!.init.headers).toMatchObject({ authorization: "Bearer jwt" });
    expect(JSON.parse(String(calls[1]!.init.body))).toEqual({
      app_id: "default",
      workflow_name: "hello",
      chat_id: "c9",
    });
  });

  it("turns an error envelope into an ApiError with its code", async () => {
    const fetch = (async () =>
      new Response(JSON.stringify({ error: { code: "token_expired", message: "expired" } }), {
        status: 401,
      })) as unknown as typeof globalThis.fetch;
    const provider = brokerTickets({ baseUrl: "http://x", token: "jwt", fetch });
    const err = await provider({ appId: "a", workflowName: "w", reason: "start" }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ApiError);
    expect(err).toMatchObject({ status: 401, code: "token_expired", retryable: false });
  });
});

describe("backoff", () => {
  it("grows, caps and jitters within bounds", () => {
    for (let a = 1; a < 12; a++) {
      const base = Math.min(10_000, 250 * 2 ** (a - 1));
      expect(backoffDelay(a, {}, () => 0)).toBe(Math.round(base / 2));
      expect(backoffDelay(a, {}, () => 0.999999)).toBeLessThanOrEqual(base);
    }
  });
});

export type { FakeSocket };

describe("start", () => {
  it("rejects when closed before the first ticket, and resolves at once when already started", async () => {
    const { client, tickets } = setup();
    tickets.fail = new ApiError(503, "unavailable", "down", true);
    const start = client.start();
    await settle(0);
    client.close();
    await expect(start).rejects.toThrow(/closed/);
    const again = setup();
    const id = await again.client.start();
    expect(await again.client.start()).toBe(id);
    expect(again.tickets.calls).toHaveLength(1);
  });
});
