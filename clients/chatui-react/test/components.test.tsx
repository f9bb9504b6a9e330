import { Transcript } from "@mozaiks/client";
import { renderToStaticMarkup } from "react-dom/server";
import { describe, expect, it } from "vitest";
import { ChatUIProvider, Composer, ConnectionStatus, MessageList, RunStatus } from "../src/index.js";

const RUN = "run-1";

function transcript() {
  const t = new Transcript();
  let seq = 0;
  const ev = (type: string, data: object) =>
    t.apply({ id: `e${++seq}`, seq, ts: "2026-12-07T00:00:00Z", type, data } as Parameters<Transcript["apply"]>[0]);
  ev("message.user", { text: "My order is late", client_msg_id: "m1" });
  ev("run.started", { run_id: RUN, trigger_seq: 1 });
  ev("tool.call", { run_id: RUN, step: 1, call_id: "c1", tool: "classify", arguments: { text: "x" } });
  ev("tool.result", { run_id: RUN, step: 1, call_id: "c1", tool: "classify", result: "general" });
  ev("agent.message", { run_id: RUN, step: 1, agent: "triage", text: "Routing you." });
  ev("input.requested", { run_id: RUN, request_id: "r1", prompt: "Order number?" });
  t.applyDelta({ run_id: RUN, step: 2, round: 1, agent: "general", offset: 0, text: "Thinking" });
  t.addPending("m2", "still there?");
  return t.view;
}

describe("ChatUI components", () => {
  it("render the test hooks: roles, seqs, the input request, a log live region", () => {
    const view = transcript();
    const html = renderToStaticMarkup(
      <ChatUIProvider config={{ api: { baseUrl: "http://x" }, chat: { defaultAppId: "default" } }}>
        <MessageList view={view} onRespond={() => {}} />
      </ChatUIProvider>,
    );
    expect(html).toContain('role="log"');
    expect(html).toContain('aria-live="polite"');
    const messages = [...html.matchAll(/data-testid="message" data-role="(\w+)" data-seq="(\d*)"/g)].map((m) => [
      m[1],
      m[2],
    ]);
    expect(messages).toEqual([
      ["user", "1"],
      ["tool", "3"],
      ["assistant", "5"],
      ["assistant", ""],
      ["user", ""],
    ]);
    expect(html).toContain('data-testid="input-request"');
    expect(html).toContain('data-testid="input-request-text"');
    expect(html).toMatch(/data-streaming="true"[^>]*aria-busy="true"/);
  });

  it("statuses carry their state for tests and a role for assistive technology", () => {
    const conn = renderToStaticMarkup(<ConnectionStatus connection={{ status: "reconnecting", attempt: 2 }} />);
    expect(conn).toContain('data-testid="connection-status"');
    expect(conn).toContain('data-status="reconnecting"');
    expect(conn).toContain('role="status"');
    const run = renderToStaticMarkup(<RunStatus run={{ status: "waiting_input" }} />);
    expect(run).toContain("Waiting for your answer");
    const composer = renderToStaticMarkup(<Composer onSend={() => {}} running onCancel={() => {}} />);
    expect(composer).toContain('data-testid="composer"');
    expect(composer).toContain('data-testid="send"');
    expect(composer).toContain("Escape cancels the run");
  });
});
