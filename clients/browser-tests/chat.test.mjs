// The chat page in a real headless Chromium (Debian's, driven by playwright-core) against a real
// fleet: two gateway replicas behind a round-robin proxy, a worker whose model streams slowly, a
// projector, nats-server and the Mongo-wire server. Screenshots go to clients/artifacts/browser/.
//
// Run by scripts/test.sh (`npm run test:browser` in clients/ after `cargo build --bin mozaiks`).
import assert from "node:assert/strict";
import { existsSync, mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { after, afterEach, before, describe, it } from "node:test";
import { ChatClient } from "@mozaiks/client";
import { chromium } from "playwright-core";
import WebSocket from "ws";
import { Fleet, REPO, SECRET } from "./fleet.mjs";
import { userToken, withExpiry } from "./jwt.mjs";
import { replyFor, startModel } from "./model.mjs";
import { startProxy } from "./proxy.mjs";

const ARTIFACTS = join(REPO, "clients", "artifacts", "browser");
const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const WAIT = 30_000;

let model;
let fleet;
let proxy;
let browser;
let page;
let step = 0;

function log(msg) {
  process.stderr.write(`browser-tests: ${msg}\n`);
}

before(async () => {
  rmSync(ARTIFACTS, { recursive: true, force: true });
  mkdirSync(ARTIFACTS, { recursive: true });
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: run scripts/browser.sh install`);
  model = await startModel({ delayMs: 120 });
  log("starting the fleet (nats-server, Mongo-wire server, worker, projector, 2 gateways)");
  fleet = await Fleet.start({ gateways: 2, modelUrl: model.url, logs: join(ARTIFACTS, "logs") });
  proxy = await startProxy(fleet.gateways);
  log(`fleet ready; proxy ${proxy.url} -> ${fleet.gateways.map((g) => g.url).join(", ")}`);
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox"] });
});

after(async () => {
  await browser?.close();
  proxy?.close();
  fleet?.stop();
  model?.close();
});

afterEach(async (t) => {
  if (page) {
    const name = `${String(++step).padStart(2, "0")}-${t.name.replace(/[^a-z0-9]+/gi, "-").slice(0, 60)}.png`;
    await page.screenshot({ path: join(ARTIFACTS, name), fullPage: true }).catch(() => {});
    await page.context().close();
    page = undefined;
  }
});

/** A fresh browser context on the page, for `user`. */
async function openPage(user, hash = "") {
  const context = await browser.newContext();
  page = await context.newPage();
  page.on("pageerror", (e) => log(`page error: ${e.message}`));
  const token = userToken(SECRET, user);
  await page.goto(`${proxy.url}/chat#token=${token}${hash}`);
  return { token };
}

async function pick(workflow) {
  const picker = page.getByTestId("workflow-picker");
  await picker.locator(`option[value="${workflow}"]`).waitFor({ state: "attached", timeout: WAIT });
  await picker.selectOption(workflow);
}

async function type(text) {
  const composer = page.getByTestId("composer");
  await composer.fill(text);
  await composer.press("Enter");
}

/** The messages the page shows: [{role, seq, text}]. */
function shown() {
  return page.evaluate(() =>
    [...document.querySelectorAll('[data-testid="message"]')].map((el) => ({
      role: el.getAttribute("data-role"),
      seq: el.getAttribute("data-seq") === "" ? null : Number(el.getAttribute("data-seq")),
      streaming: el.getAttribute("data-streaming") === "true",
      text: el.querySelector(".mz-text")?.textContent ?? "",
    })),
  );
}

async function waitRun(status) {
  await page.locator(`[data-testid="run-status"][data-status="${status}"]`).waitFor({ timeout: WAIT });
}

function chatId() {
  return page.evaluate(() => window.mozaiksChat?.chatId);
}

/** The chat's transcript from the read model, once it has every event up to the page's last seq. */
async function readModel(token, chat, lastSeq) {
  const deadline = Date.now() + WAIT;
  for (;;) {
    // Through the proxy: any live replica answers.
    const r = await fetch(`${proxy.url}/api/sessions/${chat}/messages`, {
      headers: { authorization: `Bearer ${token}` },
    }).catch(() => undefined);
    const body = r?.ok ? await r.json() : undefined;
    if (body && body.last_seq >= lastSeq) return body;
    if (Date.now() > deadline) throw new Error(`read model behind: ${JSON.stringify(body)}`);
    await new Promise((res) => setTimeout(res, 200));
  }
}

/**
 * The page shows exactly the log's messages: every user message, non-empty agent message and tool
 * call, in seq order, once; and the client applied every seq from 1 to the last, once.
 */
async function assertTranscriptEqualsLog(token) {
  const chat = await chatId();
  const client = await page.evaluate(() => ({
    seqs: window.mozaiksChat.log.map((e) => e.seq),
    stats: window.mozaiksChat.stats,
  }));
  const last = client.seqs.at(-1);
  assert.deepEqual(
    client.seqs,
    Array.from({ length: last }, (_, i) => i + 1),
    "the client applied every seq once, in order",
  );
  const rm = await readModel(token, chat, last);
  assert.equal(rm.last_seq, last, "the client has the log's last event");
  const expected = rm.messages
    .filter(
      (m) =>
        m.type === "message.user" || m.type === "tool.call" || (m.type === "agent.message" && m.text.trim() !== ""),
    )
    .map((m) => ({
      role: m.type === "message.user" ? "user" : m.type === "tool.call" ? "tool" : "assistant",
      seq: m.seq,
    }));
  const got = (await shown()).map(({ role, seq }) => ({ role, seq }));
  assert.deepEqual(got, expected, "the page shows the log's messages, no duplicate, no gap");
  for (const m of rm.messages.filter((x) => x.type === "agent.message" && x.text.trim() !== "")) {
    const el = (await shown()).find((s) => s.seq === m.seq);
    assert.equal(el.text, m.text, `message ${m.seq} shows the logged text`);
  }
  return client.stats;
}

describe("@mozaiks/client in Node (the ws package's WebSocket) on the fleet", { timeout: 60_000 }, () => {
  it("starts a chat through the broker with a list of replicas, streams the reply, and the log is gapless", async () => {
    const token = userToken(SECRET, "node-frank");
    const client = new ChatClient({
      appId: "default",
      workflowName: "hello",
      apiBaseUrl: fleet.gateways.map((g) => g.url),
      token,
      wsBaseUrl: fleet.gateways.map((g) => g.url.replace("http", "ws")),
      createSocket: (url) => new WebSocket(url),
    });
    const deltas = [];
    client.on("delta", (d) => deltas.push(d));
    const done = new Promise((resolve) => client.on("event", (e) => e.type === "run.completed" && resolve()));
    await client.start();
    client.sendMessage("From Node");
    await done;
    client.close();
    const seqs = client.log.map((e) => e.seq);
    assert.deepEqual(
      seqs,
      Array.from({ length: seqs.length }, (_, i) => i + 1),
    );
    assert.ok(deltas.length > 1, `streamed in ${deltas.length} deltas`);
    const reply = client.view.items.find((i) => i.kind === "assistant");
    assert.equal(reply?.text, replyFor("From Node"));
    assert.deepEqual(
      client.view.items.map((i) => i.kind),
      ["user", "assistant"],
    );
  });
});

describe("the chat page on a gateway fleet", { timeout: 170_000 }, () => {
  it("starts a session, streams the reply into the page, and lists the app's workflows", async () => {
    const { token } = await openPage("page-alice");
    await pick("hello");
    const options = await page.getByTestId("workflow-picker").locator("option").allTextContents();
    assert.ok(options.includes("hello") && options.includes("support_triage"), `workflows: ${options}`);
    await type("Hi there");
    await page.locator('[data-testid="message"][data-role="user"]').first().waitFor({ timeout: WAIT });
    // The reply streams: a partial text first, then the final message.
    const streaming = page.locator('[data-testid="message"][data-role="assistant"][data-streaming="true"]');
    await streaming.first().waitFor({ timeout: WAIT });
    const partial = await streaming.first().locator(".mz-text").textContent();
    await waitRun("completed");
    const final = page.locator('[data-testid="message"][data-role="assistant"][data-streaming="false"]');
    assert.equal(await final.count(), 1);
    const text = await final.first().locator(".mz-text").textContent();
    assert.equal(text, replyFor("Hi there"));
    assert.ok(partial.length < text.length, `streamed in pieces: "${partial}"`);
    assert.match(await page.evaluate(() => window.location.hash), /chat=/, "the chat id is in the fragment");
    await page.getByTestId("connection-status").and(page.locator('[data-status="open"]')).waitFor();
    await assertTranscriptEqualsLog(token);
  });

  it("reconnects through the proxy when the replica serving the socket is killed mid-reply; the transcript equals the log", async () => {
    const { token } = await openPage("page-bob");
    await pick("hello");
    await type("Survive a crash");
    await page
      .locator('[data-testid="message"][data-role="assistant"][data-streaming="true"]')
      .first()
      .waitFor({ timeout: WAIT });
    // Every connection state the client goes through from here on (a short one is not missed).
    await page.evaluate(() => {
      window.states = [];
      window.mozaiksChat.on("state", (s) => window.states.push(s.status));
    });
    const serving = proxy.websocketBackends();
    assert.equal(serving.length, 1, "one WebSocket through the proxy");
    const victim = serving[0];
    log(`SIGKILL gateway ${victim} (it serves the page's socket) mid-reply`);
    fleet.kill(victim);
    await page.waitForFunction(() => window.states.includes("reconnecting") && window.states.at(-1) === "open", null, {
      timeout: WAIT,
    });
    await page.locator('[data-testid="connection-status"][data-status="open"]').waitFor({ timeout: WAIT });
    assert.deepEqual(proxy.websocketBackends(), [1 - victim], "the page reconnected to the other replica");
    await waitRun("completed");
    const stats = await assertTranscriptEqualsLog(token);
    assert.ok(stats.opens >= 2, `reconnected (${JSON.stringify(stats)})`);
    assert.equal(stats.gaps, 0);
    const final = page.locator('[data-testid="message"][data-role="assistant"][data-streaming="false"]');
    assert.equal(await final.first().locator(".mz-text").textContent(), replyFor("Survive a crash"));
    log(`restarting gateway ${victim}`);
    await fleet.restart(victim);
  });

  it("answers an input request in the page (support_triage asks the user)", async () => {
    const { token } = await openPage("page-carol");
    await pick("support_triage");
    await type("Where is my parcel?");
    const request = page.getByTestId("input-request");
    await request.waitFor({ timeout: WAIT });
    assert.match(await request.textContent(), /order number/);
    const answer = page.getByTestId("input-request-text");
    await answer.waitFor({ timeout: WAIT });
    await answer.fill("A-100");
    await answer.press("Enter");
    await page.locator('[data-testid="input-request"][data-answered="true"]').waitFor({ timeout: WAIT });
    await waitRun("completed");
    const tools = await page
      .locator('[data-testid="message"][data-role="tool"]')
      .evaluateAll((els) => els.map((e) => e.getAttribute("data-tool")));
    assert.deepEqual(tools, ["classify", "ask_user"]);
    const texts = (await shown()).filter((m) => m.role === "assistant").map((m) => m.text);
    assert.ok(
      texts.some((t) => t.includes("Noted: A-100")),
      `the answer reached the agent: ${texts}`,
    );
    await assertTranscriptEqualsLog(token);
  });

  it("shows child workflows' progress (research runs three research_topic children)", async () => {
    const { token } = await openPage("page-gina");
    await pick("research");
    await type("boats");
    const progress = page.getByTestId("child-progress");
    await progress.waitFor({ timeout: WAIT });
    assert.equal(await progress.getByTestId("child").count(), 3);
    await page
      .locator('[data-testid="child-progress"] [data-testid="child"][data-status="completed"]')
      .nth(2)
      .waitFor({ timeout: WAIT });
    assert.match(await progress.textContent(), /3 of 3 finished/);
    await waitRun("completed");
    await assertTranscriptEqualsLog(token);
  });

  it("resumes the chat after a reload mid-reply", async () => {
    const { token } = await openPage("page-dave");
    await pick("hello");
    await type("Reload me");
    await page
      .locator('[data-testid="message"][data-role="assistant"][data-streaming="true"]')
      .first()
      .waitFor({ timeout: WAIT });
    const before = await chatId();
    await page.reload();
    await waitRun("completed");
    assert.equal(await chatId(), before, "the same chat after the reload");
    assert.equal(await page.getByTestId("workflow-picker").isDisabled(), true);
    const stats = await assertTranscriptEqualsLog(token);
    assert.equal(stats.opens, 1, "one socket after the reload");
    const final = page.locator('[data-testid="message"][data-role="assistant"][data-streaming="false"]');
    assert.equal(await final.first().locator(".mz-text").textContent(), replyFor("Reload me"));
  });

  it("gets a fresh ticket when the runtime token expires (close 1008) and goes on", async () => {
    const { token } = await openPage("page-erin");
    const tickets = [];
    // The broker's first ticket is handed over with a runtime token that expires in 3 s.
    await page.route("**/api/sessions", async (route) => {
      const res = await route.fetch();
      const body = await res.json();
      tickets.push(JSON.parse(route.request().postData() ?? "{}"));
      if (tickets.length === 1) body.runtime_token = withExpiry(body.runtime_token, SECRET, 3);
      await route.fulfill({ response: res, json: body });
    });
    const closes = [];
    await page.exposeFunction("recordState", (s) => closes.push(s));
    await pick("hello");
    await type("First");
    await page.waitForFunction(() => window.mozaiksChat);
    await page.evaluate(() => window.mozaiksChat.on("state", (s) => window.recordState(s)));
    await waitRun("completed");
    // The gateway closes the socket with 1008 when the token expires; the page asks for a ticket.
    const deadline = Date.now() + WAIT;
    while (tickets.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    assert.equal(tickets.length, 2, "a second ticket was asked for");
    assert.equal(tickets[1].chat_id, await chatId(), "for the same chat");
    assert.ok(
      closes.some((s) => s.code === 1008),
      `closed with 1008: ${JSON.stringify(closes)}`,
    );
    await page.locator('[data-testid="connection-status"][data-status="open"]').waitFor({ timeout: WAIT });
    await type("Second");
    await page
      .locator('[data-testid="message"][data-role="assistant"][data-streaming="false"]')
      .nth(1)
      .waitFor({ timeout: WAIT });
    await waitRun("completed");
    await assertTranscriptEqualsLog(token);
  });
});
