import type {
  AssistantItem,
  ChatItem,
  ChatView,
  ChildrenItem,
  ConnectionState,
  InputItem,
  RunState,
  ToolItem,
  UserItem,
  WorkflowInfo,
} from "@mozaiks/client";
import { type FormEvent, type KeyboardEvent, useEffect, useId, useRef, useState } from "react";
import type { UseChat } from "./hooks.js";

const json = (v: unknown) => {
  if (v === undefined || v === null) return "";
  if (typeof v === "string") return v;
  try {
    return JSON.stringify(v);
  } catch {
    return String(v);
  }
};

function UserMessage({ item }: { item: UserItem }) {
  return (
    <li
      className="mz-msg mz-user"
      data-testid="message"
      data-role="user"
      data-seq={item.seq ?? ""}
      data-status={item.status}
    >
      <span className="mz-who">You</span>
      <p className="mz-text">{item.text}</p>
      {item.status !== "delivered" && (
        <span className="mz-meta">{item.status === "sending" ? "sending…" : "sent"}</span>
      )}
    </li>
  );
}

function AssistantMessage({ item }: { item: AssistantItem }) {
  return (
    <li
      className={`mz-msg mz-assistant${item.streaming ? " mz-streaming" : ""}`}
      data-testid="message"
      data-role="assistant"
      data-seq={item.seq ?? ""}
      data-streaming={item.streaming ? "true" : "false"}
      data-agent={item.agent}
      aria-busy={item.streaming}
    >
      <span className="mz-who">{item.agent}</span>
      <p className="mz-text">
        {item.partial && "… "}
        {item.text}
        {item.streaming && <span className="mz-caret" aria-hidden="true" />}
      </p>
    </li>
  );
}

function ToolCall({ item }: { item: ToolItem }) {
  return (
    <li
      className={`mz-msg mz-tool${item.error ? " mz-tool-error" : ""}`}
      data-testid="message"
      data-role="tool"
      data-seq={item.seq}
      data-tool={item.tool}
      data-done={item.done ? "true" : "false"}
    >
      <details>
        <summary>
          <span className="mz-who">tool</span> <code>{item.tool}</code>{" "}
          <span className="mz-meta">{item.done ? (item.error ? "failed" : "done") : "running…"}</span>
        </summary>
        <dl className="mz-tool-io">
          <dt>arguments</dt>
          <dd>
            <code>{json(item.arguments)}</code>
          </dd>
          {item.done && (
            <>
              <dt>{item.error ? "error" : "result"}</dt>
              <dd data-testid="tool-result">
                <code>{item.error ? item.error : json(item.result)}</code>
              </dd>
            </>
          )}
        </dl>
      </details>
    </li>
  );
}

/** A question the run waits on; the answer goes back with `respond`. */
export function InputRequest({
  item,
  waiting,
  onRespond,
}: {
  item: InputItem;
  waiting: boolean;
  onRespond: (requestId: string, text: string) => void;
}) {
  const [text, setText] = useState("");
  const [sent, setSent] = useState(false);
  const ref = useRef<HTMLInputElement>(null);
  const id = useId();
  const open = waiting && item.answer === undefined && !sent;
  useEffect(() => {
    if (open) ref.current?.focus();
  }, [open]);
  const submit = (e: FormEvent) => {
    e.preventDefault();
    if (!text.trim()) return;
    onRespond(item.requestId, text);
    setSent(true);
  };
  return (
    <li
      className="mz-msg mz-input"
      data-testid="input-request"
      data-request-id={item.requestId}
      data-seq={item.seq}
      data-answered={item.answer !== undefined ? "true" : "false"}
    >
      <form onSubmit={submit} aria-labelledby={`${id}-q`}>
        <p id={`${id}-q`} className="mz-text">
          <span className="mz-who">question</span> {item.prompt}
        </p>
        {item.answer !== undefined ? (
          <p className="mz-answer">
            Answered: <q>{item.answer}</q>
          </p>
        ) : open ? (
          <div className="mz-row">
            <input
              ref={ref}
              data-testid="input-request-text"
              aria-label={item.prompt}
              value={text}
              onChange={(e) => setText(e.target.value)}
            />
            <button type="submit" data-testid="input-request-send" disabled={!text.trim()}>
              Answer
            </button>
          </div>
        ) : sent ? (
          <p className="mz-meta">sending your answer…</p>
        ) : (
          <p className="mz-meta">no longer waiting</p>
        )}
      </form>
    </li>
  );
}

/** The child workflows a step spawned and how far each got. */
export function ChildProgress({ item }: { item: ChildrenItem }) {
  const done = item.children.filter((c) => c.status !== "running").length;
  return (
    <li className="mz-msg mz-children" data-testid="child-progress" data-seq={item.seq}>
      <span className="mz-who">child workflows</span>{" "}
      <span className="mz-meta">
        {done} of {item.children.length} finished
      </span>
      <progress max={item.children.length} value={done} aria-label="child workflows finished" />
      <ul>
        {item.children.map((c) => (
          <li key={c.childChatId} data-testid="child" data-status={c.status}>
            <code>{c.workflow}</code> {c.input} — <span className={`mz-child-${c.status}`}>{c.status}</span>
          </li>
        ))}
      </ul>
    </li>
  );
}

function Item({
  item,
  run,
  onRespond,
}: {
  item: ChatItem;
  run: RunState;
  onRespond: (requestId: string, text: string) => void;
}) {
  switch (item.kind) {
    case "user":
      return <UserMessage item={item} />;
    case "assistant":
      return <AssistantMessage item={item} />;
    case "tool":
      return <ToolCall item={item} />;
    case "input":
      return (
        <InputRequest
          item={item}
          waiting={run.status === "waiting_input" && run.waitingFor?.requestId === item.requestId}
          onRespond={onRespond}
        />
      );
    case "children":
      return <ChildProgress item={item} />;
    case "notice":
      return (
        <li className={`mz-msg mz-notice mz-${item.level}`} data-testid="notice" data-seq={item.seq}>
          {item.text}
        </li>
      );
  }
}

/**
 * The conversation: a `log` live region, so screen readers announce each new message; streaming
 * text is `aria-busy` until its final message replaces it.
 */
export function MessageList({
  view,
  onRespond,
}: {
  view: ChatView;
  onRespond: (requestId: string, text: string) => void;
}) {
  const end = useRef<HTMLDivElement>(null);
  const count = view.items.length;
  const last = view.items.at(-1);
  const lastLen = last && "text" in last ? last.text.length : 0;
  // biome-ignore lint/correctness/useExhaustiveDependencies: scroll when messages are added or grow
  useEffect(() => {
    end.current?.scrollIntoView?.({ block: "end" });
  }, [count, lastLen]);
  return (
    <div className="mz-list-wrap">
      <ol
        className="mz-list"
        role="log"
        aria-live="polite"
        aria-relevant="additions text"
        aria-label="Conversation"
        data-testid="transcript"
        data-last-seq={view.lastSeq}
      >
        {view.items.map((item) => (
          <Item key={item.key} item={item} run={view.run} onRespond={onRespond} />
        ))}
      </ol>
      <div ref={end} />
    </div>
  );
}

const runLabels: Record<RunState["status"], string> = {
  idle: "Ready",
  running: "Working…",
  waiting_input: "Waiting for your answer",
  waiting_children: "Waiting for child workflows",
  completed: "Done",
  failed: "Failed",
  cancelled: "Cancelled",
};

export function RunStatus({ run }: { run: RunState }) {
  const label = runLabels[run.status];
  return (
    <span className={`mz-badge mz-run-${run.status}`} data-testid="run-status" data-status={run.status}>
      {label}
      {run.status === "running" && run.agent ? `: ${run.agent}` : ""}
      {run.error ? ` (${run.error.code})` : ""}
    </span>
  );
}

const connLabels: Record<ConnectionState["status"], string> = {
  idle: "Not connected",
  connecting: "Connecting…",
  open: "Connected",
  reconnecting: "Reconnecting…",
  failed: "Cannot connect",
  closed: "Closed",
};

export function ConnectionStatus({ connection }: { connection: ConnectionState }) {
  return (
    <span
      className={`mz-badge mz-conn-${connection.status}`}
      role="status"
      data-testid="connection-status"
      data-status={connection.status}
      title={connection.error ?? connection.reason ?? ""}
    >
      {connLabels[connection.status]}
      {connection.status === "failed" && connection.error ? `: ${connection.error}` : ""}
    </span>
  );
}

/** The message box: Enter sends, Shift+Enter starts a new line, Escape cancels a running run. */
export function Composer({
  onSend,
  onCancel,
  running,
  disabled,
  placeholder = "Type a message",
}: {
  onSend: (text: string) => void;
  onCancel?: () => void;
  running?: boolean;
  disabled?: boolean;
  placeholder?: string;
}) {
  const [text, setText] = useState("");
  const id = useId();
  const send = () => {
    const t = text.trim();
    if (!t || disabled) return;
    onSend(t);
    setText("");
  };
  const onKey = (e: KeyboardEvent<HTMLTextAreaElement>) => {
    if (e.key === "Enter" && !e.shiftKey && !e.nativeEvent.isComposing) {
      e.preventDefault();
      send();
    } else if (e.key === "Escape" && running && onCancel) {
      e.preventDefault();
      onCancel();
    }
  };
  return (
    <form
      className="mz-composer"
      onSubmit={(e) => {
        e.preventDefault();
        send();
      }}
    >
      <label htmlFor={id} className="mz-sr-only">
        Message
      </label>
      <textarea
        id={id}
        data-testid="composer"
        rows={2}
        value={text}
        placeholder={placeholder}
        disabled={disabled}
        onChange={(e) => setText(e.target.value)}
        onKeyDown={onKey}
        aria-describedby={`${id}-hint`}
      />
      <span id={`${id}-hint`} className="mz-sr-only">
        Enter sends, Shift+Enter adds a line{running ? ", Escape cancels the run" : ""}.
      </span>
      <button type="submit" data-testid="send" disabled={disabled || !text.trim()}>
        Send
      </button>
      {running && onCancel && (
        <button type="button" data-testid="cancel" className="mz-secondary" onClick={onCancel}>
          Cancel run
        </button>
      )}
    </form>
  );
}

/** A `<select>` of the workflows the user's app may run. */
export function WorkflowPicker({
  workflows,
  value,
  onChange,
  disabled,
}: {
  workflows: WorkflowInfo[];
  value: string | undefined;
  onChange: (name: string) => void;
  disabled?: boolean;
}) {
  const id = useId();
  const current = workflows.find((w) => w.name === value);
  return (
    <div className="mz-picker">
      <label htmlFor={id}>Workflow</label>
      <select
        id={id}
        data-testid="workflow-picker"
        value={value ?? ""}
        disabled={disabled}
        onChange={(e) => onChange(e.target.value)}
        aria-describedby={`${id}-desc`}
      >
        {value === undefined && <option value="">Pick a workflow</option>}
        {workflows.map((w) => (
          <option key={w.name} value={w.name}>
            {w.name}
          </option>
        ))}
      </select>
      <span id={`${id}-desc`} className="mz-meta">
        {current?.description ?? ""}
      </span>
    </div>
  );
}

/** A whole chat: status line, conversation, composer. */
export function ChatWindow({ chat, title }: { chat: UseChat; title?: string }) {
  const busy = ["running", "waiting_children"].includes(chat.view.run.status);
  return (
    <section className="mz-chat" aria-label={title ?? "Chat"}>
      <div className="mz-status">
        <ConnectionStatus connection={chat.connection} />
        <RunStatus run={chat.view.run} />
      </div>
      <MessageList view={chat.view} onRespond={chat.respond} />
      {chat.error && (
        <p className="mz-error-line" role="alert" data-testid="chat-error" data-code={chat.error.code}>
          {chat.error.message} ({chat.error.code})
        </p>
      )}
      <Composer
        onSend={(t) => chat.sendMessage(t)}
        onCancel={() => chat.cancel("cancelled by the user")}
        running={busy || chat.view.run.status === "waiting_input"}
        disabled={!chat.workflow || chat.connection.status === "failed"}
      />
    </section>
  );
}
