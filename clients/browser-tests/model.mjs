// A scripted OpenAI-compatible chat-completions server that streams slowly, so the browser tests
// see text arrive piece by piece and can kill a replica in the middle of a reply.
//
// A call with tools and no tool result yet calls one tool (classify, ask_user or set_context,
// with arguments from the conversation); otherwise it streams a reply word by word.
import { createServer } from "node:http";

export const WORDS = 24;

function lastUserText(messages) {
  for (let i = messages.length - 1; i >= 0; i--) {
    const m = messages[i];
    if (m.role === "user" && !m.name) return String(m.content ?? "");
  }
  return "";
}

/** The reply the model streams after `userText` (tests compare the page's text with it). */
export function replyFor(userText, toolContent) {
  const words = Array.from({ length: WORDS }, (_, i) => `w${i + 1}`).join(" ");
  const noted = toolContent ? ` Noted: ${toolContent}.` : "";
  return `Reply to "${userText}":${noted} ${words}.`;
}

function chunk(delta, finish = null) {
  return `data: ${JSON.stringify({ id: "fake", object: "chat.completion.chunk", choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`;
}

/** Starts the model on a free port; `delayMs` between streamed words. */
export async function startModel({ delayMs = 100 } = {}) {
  const calls = [];
  const server = createServer((req, res) => {
    let body = "";
    req.on("data", (c) => {
      body += c;
    });
    req.on("end", async () => {
      const request = JSON.parse(body || "{}");
      const messages = request.messages ?? [];
      const tools = (request.tools ?? []).map((t) => t.function?.name);
      const last = messages.at(-1);
      const userText = lastUserText(messages);
      calls.push({ tools, last: last?.role });
      res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
      const usage = `data: ${JSON.stringify({ id: "fake", choices: [], usage: { prompt_tokens: 10, completion_tokens: 20, total_tokens: 30 } })}\n\n`;
      const call = (name, args) => {
        res.write(
          chunk({
            role: "assistant",
            tool_calls: [
              {
                index: 0,
                id: `call_${calls.length}`,
                type: "function",
                function: { name, arguments: JSON.stringify(args) },
              },
            ],
          }),
        );
        res.write(chunk({}, "tool_calls"));
        res.write(usage);
        res.end("data: [DONE]\n\n");
      };
      if (last?.role !== "tool") {
        if (tools.includes("classify")) return call("classify", { text: userText });
        if (tools.includes("ask_user")) return call("ask_user", { question: "Could you give me your order number?" });
        if (tools.includes("set_context")) return call("set_context", { key: "resolved", value: true });
      }
      const text = replyFor(userText, last?.role === "tool" ? String(last.content ?? "") : "");
      const pieces = text.split(/(?<= )/);
      res.write(chunk({ role: "assistant", content: "" }));
      for (const p of pieces) {
        if (res.destroyed) return;
        res.write(chunk({ content: p }));
        await new Promise((r) => setTimeout(r, delayMs));
      }
      res.write(chunk({}, "stop"));
      res.write(usage);
      res.end("data: [DONE]\n\n");
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address();
  return { url: `http://127.0.0.1:${port}/v1`, calls, close: () => server.close() };
}
