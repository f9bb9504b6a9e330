// A minimal chat app's back end (Node 20.19+, no dependencies): it holds the app's API key, signs
// its users in (here: a name in a cookie, for the demo), and hands the browser tickets for the
// runtime. The browser never sees the API key; it connects to the runtime's WebSocket with the
// ticket (`@mozaiks/client`, served from clients/client/dist), and reads the AG-UI stream
// directly from the runtime (a cross-origin request: CORS).
//
//   MOZAIKS_API_KEY=mzk_…  node examples/chat-app/server.mjs
//
// Environment: MOZAIKS_API_KEY (required), MOZAIKS_URL (default http://127.0.0.1:8000),
// MOZAIKS_APP_ID (default "default"), HOST (default 127.0.0.1), PORT (default 3000).

import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { randomUUID } from "node:crypto";

const here = fileURLToPath(new URL(".", import.meta.url));
const clientDist = join(here, "../../clients/client/dist");
const runtime = (process.env.MOZAIKS_URL ?? "http://127.0.0.1:8000").replace(/\/$/, "");
const appId = process.env.MOZAIKS_APP_ID ?? "default";
const apiKey = process.env.MOZAIKS_API_KEY;
const host = process.env.HOST ?? "127.0.0.1";
const port = Number(process.env.PORT ?? 3000);

if (!apiKey) {
  console.error("chat-app: set MOZAIKS_API_KEY (see examples/chat-app/README.md)");
  process.exit(1);
}

/** Calls the runtime with the app's API key. */
async function runtimeCall(method, path, body) {
  const r = await fetch(`${runtime}${path}`, {
    method,
    headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  return { status: r.status, body: text };
}

/** The signed-in user: a demo user id kept in a cookie (a real app has its own sign-in). */
function userOf(req, res) {
  const m = /(?:^|;\s*)demo_user=([A-Za-z0-9_-]{1,64})/.exec(req.headers.cookie ?? "");
  if (m) return m[1];
  const id = `demo-${randomUUID().slice(0, 8)}`;
  res.setHeader("set-cookie", `demo_user=${id}; Path=/; HttpOnly; SameSite=Lax`);
  return id;
}

async function readJson(req) {
  let text = "";
  for await (const chunk of req) {
    text += chunk;
    if (text.length > 64 * 1024) throw new Error("body too large");
  }
  return text === "" ? {} : JSON.parse(text);
}

const types = { ".js": "text/javascript", ".html": "text/html; charset=utf-8", ".map": "application/json" };

async function sendFile(res, path) {
  try {
    const data = await readFile(path);
    res.writeHead(200, { "content-type": types[extname(path)] ?? "application/octet-stream" });
    res.end(data);
  } catch {
    res.writeHead(404, { "content-type": "text/plain" });
    res.end(
      path.startsWith(clientDist)
        ? "@mozaiks/client is not built: run `npm ci && npm run build` in clients/\n"
        : "not found\n",
    );
  }
}

const server = createServer(async (req, res) => {
  const url = new URL(req.url ?? "/", `http://${req.headers.host}`);
  try {
    if (req.method === "GET" && url.pathname === "/") {
      return sendFile(res, join(here, "index.html"));
    }
    if (req.method === "GET" && url.pathname.startsWith("/mozaiks-client/")) {
      const rel = normalize(url.pathname.slice("/mozaiks-client/".length)).replace(/^(\.\.[/\\])+/, "");
      return sendFile(res, join(clientDist, rel));
    }
    if (req.method === "GET" && url.pathname === "/config") {
      res.writeHead(200, { "content-type": "application/json" });
      return res.end(JSON.stringify({ runtime, appId }));
    }
    if (req.method === "GET" && url.pathname === "/workflows") {
      const r = await runtimeCall("GET", "/api/workflows");
      res.writeHead(r.status, { "content-type": "application/json" });
      return res.end(r.body);
    }
    // The ticket endpoint `@mozaiks/client`'s getTicket calls: {appId, workflowName, chatId?,
    // reason, context?} → the runtime's ticket, for the signed-in user only.
    if (req.method === "POST" && url.pathname === "/ticket") {
      const user = userOf(req, res);
      const ask = await readJson(req);
      const r = await runtimeCall("POST", "/api/sessions", {
        app_id: appId,
        workflow_name: String(ask.workflowName ?? "hello"),
        chat_id: ask.chatId ?? undefined,
        context: ask.context ?? undefined,
        user_id: user,
      });
      res.writeHead(r.status, { "content-type": "application/json" });
      return res.end(r.body);
    }
    res.writeHead(404, { "content-type": "text/plain" });
    res.end("not found\n");
  } catch (e) {
    res.writeHead(500, { "content-type": "text/plain" });
    res.end(`chat-app: ${e.message}\n`);
  }
});

server.listen(port, host, () => {
  console.log(`chat-app: http://${host}:${port}  (runtime ${runtime}, app ${appId}); Ctrl-C stops it`);
});
