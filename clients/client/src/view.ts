// The chat as a UI shows it, folded from the durable events (in seq order), the streamed deltas
// and the messages the user sent that the log does not have yet. Framework-free: each change
// makes a new immutable `ChatView` snapshot, so React (or anything) can compare by reference.

import { DeltaText } from "./deltas.js";
import type { AgentDelta, EventFrame } from "./types.js";

export interface UserItem {
  kind: "user";
  key: string;
  /** Set once the message is in the log. */
  seq?: number;
  text: string;
  clientMsgId?: string;
  /** `sending` (not acknowledged yet), `sent` (acknowledged: durable), `delivered` (in the log). */
  status: "sending" | "sent" | "delivered";
}

export interface AssistantItem {
  kind: "assistant";
  key: string;
  /** The `agent.message`'s seq; absent while the text streams. */
  seq?: number;
  agent: string;
  text: string;
  /** True while deltas stream in and the durable `agent.message` has not come. */
  streaming: boolean;
  /** Streaming text whose beginning this client did not see (it joined mid-message). */
  partial: boolean;
  runId?: string;
  step: number;
  structured?: unknown;
}

export interface ToolItem {
  kind: "tool";
  key: string;
  seq: number;
  runId: string;
  step: number;
  callId: string;
  tool: string;
  arguments: unknown;
  /** Set when the `tool.result` came. */
  done: boolean;
  result?: unknown;
  error?: string | null;
  resultSeq?: number;
}

export interface InputItem {
  kind: "input";
  key: string;
  seq: number;
  runId: string;
  requestId: string;
  prompt: string;
  /** The user's answer, once `input.received` is in the log. */
  answer?: string;
  answerSeq?: number;
}

export interface ChildInfo {
  childChatId: string;
  workflow: string;
  index: number;
  input: string;
  status: "running" | "completed" | "failed" | "cancelled" | string;
  output?: unknown;
}

export interface ChildrenItem {
  kind: "children";
  key: string;
  seq: number;
  runId: string;
  step: number;
  children: ChildInfo[];
}

export interface NoticeItem {
  kind: "notice";
  key: string;
  seq: number;
  level: "info" | "error";
  text: string;
}

export type ChatItem = UserItem | AssistantItem | ToolItem | InputItem | ChildrenItem | NoticeItem;

export type RunStatus =
  | "idle"
  | "running"
  | "waiting_input"
  | "waiting_children"
  | "completed"
  | "failed"
  | "cancelled";

export interface RunState {
  status: RunStatus;
  runId?: string;
  /** The agent whose turn it is. */
  agent?: string;
  step?: number;
  /** `run.failed`'s code and reason. */
  error?: { code: string; reason: string };
  /** The input request the run waits for. */
  waitingFor?: { requestId: string; prompt: string };
}

export interface ChatView {
  /** The last durable seq applied (0: none). */
  lastSeq: number;
  /** What to show, in order: the log's items, then streaming text, then unsent messages. */
  items: readonly ChatItem[];
  run: RunState;
  /** The chat's context variables as the log tells them. */
  context: Readonly<Record<string, unknown>>;
}

interface Draft {
  key: string;
  runId: string;
  step: number;
  round: number;
  agent: string;
  text: DeltaText;
}

const stepKey = (runId: string | null | undefined, step: number) => `${runId ?? "-"}:${step}`;

/** Folds events, deltas and pending messages into [`ChatView`] snapshots. */
export class Transcript {
  private events: EventFrame[] = [];
  /** Seqs up to this are settled even if missing (a truncated log). */
  private base = 0;
  private items: ChatItem[] = [];
  private drafts: Draft[] = [];
  private pending: UserItem[] = [];
  private run: RunState = { status: "idle" };
  private context: Record<string, unknown> = {};
  /** Per `run:step`: the highest round whose `agent.message` came (its deltas are stale). */
  private finalized = new Map<string, number>();
  /** Per `run:step`: the round of the last `model.replied`. */
  private replied = new Map<string, number>();
  private snapshot: ChatView = { lastSeq: 0, items: [], run: { status: "idle" }, context: {} };

  get view(): ChatView {
    return this.snapshot;
  }

  get lastSeq(): number {
    return Math.max(this.base, this.events.at(-1)?.seq ?? 0);
  }

  /** Continues after `seq` although the events up to it are not all here (`log_truncated`). */
  skipTo(seq: number): ChatView {
    this.base = Math.max(this.base, seq);
    return this.publish();
  }

  /** Every durable event applied, in seq order. */
  get log(): readonly EventFrame[] {
    return this.events;
  }

  /** Applies the next durable event (the caller keeps seq order and drops duplicates). */
  apply(e: EventFrame): ChatView {
    this.events.push(e);
    this.fold(e);
    return this.publish();
  }

  /**
   * Adds events the client missed (a `log_truncated` resync answered from the read model):
   * merged by seq, and the view is folded again.
   */
  insertHistory(frames: EventFrame[]): ChatView {
    const have = new Set(this.events.map((e) => e.seq));
    const merged = [...this.events, ...frames.filter((f) => !have.has(f.seq))];
    merged.sort((a, b) => a.seq - b.seq);
    const pending = this.pending;
    this.clear();
    this.pending = pending;
    for (const e of merged) {
      this.events.push(e);
      this.fold(e);
    }
    return this.publish();
  }

  /** Forgets every event (`log_recreated`: the seqs belonged to another history). */
  reset(): ChatView {
    const pending = this.pending;
    this.clear();
    this.base = 0;
    this.pending = pending;
    return this.publish();
  }

  /** Applies an `agent.delta`; returns null when it is stale (its message is already final). */
  applyDelta(d: AgentDelta): ChatView | null {
    const sk = stepKey(d.run_id, d.step);
    const round = d.round ?? 1;
    if ((this.finalized.get(sk) ?? 0) >= round) return null;
    const key = `draft:${sk}:${round}:${d.agent}`;
    let draft = this.drafts.find((x) => x.key === key);
    if (!draft) {
      draft = {
        key,
        runId: d.run_id ?? "",
        step: d.step,
        round,
        agent: d.agent,
        text: new DeltaText(),
      };
      this.drafts.push(draft);
    }
    draft.text.apply(d.offset, d.text);
    return this.publish();
  }

  /** A message the user sent, shown until the log has it. */
  addPending(clientMsgId: string, text: string): ChatView {
    this.pending.push({ kind: "user", key: `pending:${clientMsgId}`, text, clientMsgId, status: "sending" });
    return this.publish();
  }

  /** The gateway acknowledged the message: it is durable. */
  markSent(clientMsgId: string): ChatView {
    const i = this.pending.findIndex((p) => p.clientMsgId === clientMsgId);
    const p = this.pending[i];
    if (p && p.status === "sending") {
      this.pending[i] = { ...p, status: "sent" };
      return this.publish();
    }
    return this.snapshot;
  }

  /** Forgets a pending message (the caller gave up on it). */
  dropPending(clientMsgId: string): ChatView {
    this.pending = this.pending.filter((p) => p.clientMsgId !== clientMsgId);
    return this.publish();
  }

  private clear(): void {
    this.events = [];
    this.items = [];
    this.drafts = [];
    this.pending = [];
    this.run = { status: "idle" };
    this.context = {};
    this.finalized.clear();
    this.replied.clear();
  }

  private publish(): ChatView {
    const drafts: AssistantItem[] = this.drafts.map((d) => ({
      kind: "assistant",
      key: d.key,
      agent: d.agent,
      text: d.text.text,
      streaming: true,
      partial: d.text.partial,
      runId: d.runId,
      step: d.step,
    }));
    this.snapshot = {
      lastSeq: this.lastSeq,
      items: [...this.items, ...drafts, ...this.pending],
      run: this.run,
      context: this.context,
    };
    return this.snapshot;
  }

  private update<T extends ChatItem>(pred: (i: ChatItem) => i is T, change: (i: T) => T): void {
    for (let k = this.items.length - 1; k >= 0; k--) {
      const it = this.items[k];
      if (it && pred(it)) {
        this.items[k] = change(it);
        return;
      }
    }
  }

  private fold(e: EventFrame): void {
    const key = `seq:${e.seq}`;
    switch (e.type) {
      case "message.user": {
        const id = e.data.client_msg_id ?? undefined;
        if (id) this.pending = this.pending.filter((p) => p.clientMsgId !== id);
        this.items.push({
          kind: "user",
          key,
          seq: e.seq,
          text: e.data.text,
          ...(id ? { clientMsgId: id } : {}),
          status: "delivered",
        });
        break;
      }
      case "run.started":
        this.run = { status: "running", runId: e.data.run_id };
        break;
      case "step.started":
        this.run = { ...this.run, status: "running", agent: e.data.agent, step: e.data.step };
        break;
      case "model.replied": {
        const round = (e.data as { round?: number }).round ?? 1;
        if (round > 0) this.replied.set(stepKey(e.data.run_id, e.data.step), round);
        break;
      }
      case "agent.message": {
        const sk = stepKey(e.data.run_id, e.data.step);
        const round = this.replied.get(sk) ?? (this.finalized.get(sk) ?? 0) + 1;
        this.finalized.set(sk, Math.max(round, this.finalized.get(sk) ?? 0));
        // The streamed drafts of this step up to this round are replaced by the final text.
        this.drafts = this.drafts.filter((d) => !(stepKey(d.runId, d.step) === sk && d.round <= round));
        if (e.data.text.trim() !== "") {
          this.items.push({
            kind: "assistant",
            key,
            seq: e.seq,
            agent: e.data.agent,
            text: e.data.text,
            streaming: false,
            partial: false,
            runId: e.data.run_id,
            step: e.data.step,
            ...(e.data.structured !== undefined ? { structured: e.data.structured } : {}),
          });
        }
        break;
      }
      case "tool.call":
        this.items.push({
          kind: "tool",
          key,
          seq: e.seq,
          runId: e.data.run_id,
          step: e.data.step,
          callId: e.data.call_id,
          tool: e.data.tool,
          arguments: e.data.arguments,
          done: false,
        });
        break;
      case "tool.result": {
        const d = e.data;
        this.update(
          (i): i is ToolItem => i.kind === "tool" && i.callId === d.call_id && i.runId === d.run_id,
          (i) => ({ ...i, done: true, result: d.result, error: d.error ?? null, resultSeq: e.seq }),
        );
        break;
      }
      case "context.updated":
        this.context = { ...this.context, [e.data.key]: e.data.value };
        break;
      case "input.requested":
        this.items.push({
          kind: "input",
          key,
          seq: e.seq,
          runId: e.data.run_id,
          requestId: e.data.request_id,
          prompt: e.data.prompt,
        });
        this.run = {
          ...this.run,
          status: "waiting_input",
          waitingFor: { requestId: e.data.request_id, prompt: e.data.prompt },
        };
        break;
      case "input.received": {
        const d = e.data;
        this.update(
          (i): i is InputItem => i.kind === "input" && i.requestId === d.request_id,
          (i) => ({ ...i, answer: d.text, answerSeq: e.seq }),
        );
        const { waitingFor: _w, ...rest } = this.run;
        this.run = { ...rest, status: "running" };
        break;
      }
      case "child.spawned": {
        const d = e.data;
        const child: ChildInfo = {
          childChatId: d.child_chat_id,
          workflow: d.workflow,
          index: d.index ?? 0,
          input: d.input ?? "",
          status: "running",
        };
        const group = this.items.find(
          (i): i is ChildrenItem => i.kind === "children" && i.runId === d.run_id && i.step === (d.step ?? 0),
        );
        if (group) {
          this.update(
            (i): i is ChildrenItem => i === group,
            (i) => ({ ...i, children: [...i.children, child].sort((a, b) => a.index - b.index) }),
          );
        } else {
          this.items.push({ kind: "children", key, seq: e.seq, runId: d.run_id, step: d.step ?? 0, children: [child] });
        }
        this.run = { ...this.run, status: "waiting_children" };
        break;
      }
      case "child.completed": {
        const d = e.data;
        this.update(
          (i): i is ChildrenItem => i.kind === "children" && i.children.some((c) => c.childChatId === d.child_chat_id),
          (i) => ({
            ...i,
            children: i.children.map((c) =>
              c.childChatId === d.child_chat_id ? { ...c, status: d.status, output: d.output } : c,
            ),
          }),
        );
        break;
      }
      case "run.completed":
        this.endRun(e.data.run_id);
        this.run = { status: "completed", runId: e.data.run_id };
        break;
      case "run.failed":
        this.endRun(e.data.run_id);
        this.run = { status: "failed", runId: e.data.run_id, error: { code: e.data.code, reason: e.data.reason } };
        this.items.push({
          kind: "notice",
          key,
          seq: e.seq,
          level: "error",
          text: `Run failed: ${e.data.reason} (${e.data.code})`,
        });
        break;
      case "run.cancelled":
        this.endRun(e.data.run_id);
        this.run = { status: "cancelled", runId: e.data.run_id };
        this.items.push({
          kind: "notice",
          key,
          seq: e.seq,
          level: "info",
          text: e.data.reason ? `Run cancelled: ${e.data.reason}` : "Run cancelled.",
        });
        break;
      default:
        break;
    }
  }

  /** A run ended: its drafts (a stream cut short) are gone, the text that counts is in the log. */
  private endRun(runId: string): void {
    this.drafts = this.drafts.filter((d) => d.runId !== runId);
  }
}
