// A real fleet for the browser tests: nats-server and the Mongo-wire server from .tools/ (installed
// by scripts/servers.sh install), and `mozaiks` processes (target/debug/mozaiks — under CARGO_TARGET_DIR when set — or MOZAIKS_BIN):
// a worker, a projector and gateway replicas, each a separate process sharing nothing but NATS.
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { createWriteStream, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer, connect as tcp } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const SECRET = "browser-test-secret-that-is-long-enough-0123456789";
const VENV = join(REPO, ".tools", "venv", "bin");

export async function freePort() {
  const s = createServer();
  await new Promise((r) => s.listen(0, "127.0.0.1", r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(what, fn, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    try {
      if (await fn()) return;
    } catch (e) {
      last = e;
    }
    await sleep(100);
  }
  throw new Error(`${what} not ready within ${timeoutMs} ms${last ? `: ${last}` : ""}`);
}

const portOpen = (port) =>
  new Promise((resolve) => {
    const s = tcp(port, "127.0.0.1");
    s.on("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.on("error", () => resolve(false));
  });

// Processes of every fleet of this test process: killed when it exits, however it exits.
const running = new Set();
process.on("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});
for (const signal of ["SIGINT", "SIGTERM"]) process.once(signal, () => process.exit(130));

export class Fleet {
  constructor(dir, logs) {
    this.dir = dir;
    this.logs = logs;
    this.procs = [];
    this.gateways = [];
    this.namespace = `b${randomBytes(6).toString("hex")}`;
    this.db = `mz_browser_${randomBytes(6).toString("hex")}`;
  }

  /** Servers, a worker (whose model is `modelUrl`), a projector and `gateways` gateway replicas. */
  static async start({ gateways = 2, modelUrl, logs }) {
    const target = process.env.CARGO_TARGET_DIR || join(REPO, "target");
    const bin = process.env.MOZAIKS_BIN ?? join(target, "debug", "mozaiks");
    if (!existsSync(bin)) throw new Error(`${bin} is missing: run \`cargo build --bin mozaiks\` first`);
    for (const tool of ["nats-server", "secantusd-py"]) {
      if (!existsSync(join(VENV, tool))) throw new Error(`${tool} is missing: run \`scripts/servers.sh install\``);
    }
    mkdirSync(logs, { recursive: true });
    const fleet = new Fleet(mkdtempSync(join(tmpdir(), "mozaiks-browser-")), logs);
    fleet.bin = bin;
    fleet.modelUrl = modelUrl;
    try {
      const natsPort = await freePort();
      const mongoPort = await freePort();
      fleet.natsUrl = `nats://127.0.0.1:${natsPort}`;
      fleet.mongoUri = `mongodb://127.0.0.1:${mongoPort}/?directConnection=true`;
      mkdirSync(join(fleet.dir, "nats"));
      mkdirSync(join(fleet.dir, "mongo"));
      fleet.spawn("nats", join(VENV, "nats-server"), [
        "-js",
        "-a",
        "127.0.0.1",
        "-p",
        String(natsPort),
        "-sd",
        join(fleet.dir, "nats"),
      ]);
      fleet.spawn("mongo", join(VENV, "secantusd-py"), [
        "--host",
        "127.0.0.1",
        "--port",
        String(mongoPort),
        "--storage-path",
        join(fleet.dir, "mongo"),
        "--log-level",
        "WARNING",
      ]);
      await waitFor("nats-server", () => portOpen(natsPort));
      await waitFor("the Mongo-wire server", () => portOpen(mongoPort));
      fleet.role("worker", {
        OPENAI_BASE_URL: modelUrl,
        OPENAI_API_KEY: "browser-tests",
        MOZAIKS_MODEL_MAX_ATTEMPTS: "1",
      });
      fleet.role("projector");
      for (let i = 0; i < gateways; i++) {
        const port = await freePort();
        fleet.gateways.push({ port, url: `http://127.0.0.1:${port}`, proc: fleet.role("gateway", {}, port) });
      }
      await Promise.all(fleet.gateways.map((g) => fleet.waitReady(g.url)));
      return fleet;
    } catch (e) {
      fleet.stop();
      throw e;
    }
  }

  spawn(name, program, args, env = {}) {
    const log = join(this.logs, `${name}-${this.procs.length}.log`);
    const out = createWriteStream(log);
    const child = spawn(program, args, {
      env: { PATH: process.env.PATH ?? "", ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    running.add(child);
    child.on("exit", () => running.delete(child));
    child.stdout.pipe(out);
    child.stderr.pipe(out);
    const proc = { name, child, log };
    this.procs.push(proc);
    return proc;
  }

  role(role, env = {}, port) {
    return this.spawn(role, this.bin, [role], {
      NATS_URL: this.natsUrl,
      MONGO_URI: this.mongoUri,
      MOZAIKS_MONGO_DB: this.db,
      MOZAIKS_NAMESPACE: this.namespace,
      JWT_SECRET: SECRET,
      MOZAIKS_WORKFLOWS_DIR: join(REPO, "workflows"),
      MOZAIKS_ARCHIVE_DIR: join(this.dir, "archive"),
      MOZAIKS_DRAIN_SECONDS: "3",
      MOZAIKS_LOG_FORMAT: "json",
      LOG_LEVEL: process.env.MOZAIKS_TEST_LOG_LEVEL ?? "info,async_nats=warn",
      ...(port ? { MOZAIKS_LISTEN: `127.0.0.1:${port}` } : {}),
      ...env,
    });
  }

  async waitReady(url) {
    await waitFor(`${url}/health/ready`, async () => (await fetch(`${url}/health/ready`)).status === 200);
  }

  /** SIGKILLs gateway `i`. */
  kill(i) {
    this.gateways[i].proc.child.kill("SIGKILL");
  }

  /** Starts gateway `i` again on its port and waits until it is ready. */
  async restart(i) {
    const g = this.gateways[i];
    await new Promise((r) =>
      g.proc.child.exitCode !== null || g.proc.child.signalCode ? r() : g.proc.child.on("exit", r),
    );
    g.proc = this.role("gateway", {}, g.port);
    await this.waitReady(g.url);
  }

  /** The last lines of every process's log. */
  tails(lines = 30) {
    return this.procs
      .map((p) => {
        let text = "";
        try {
          text = readFileSync(p.log, "utf8");
        } catch {
          // not written yet
        }
        return `--- ${p.name} (${p.log})\n${text.split("\n").slice(-lines).join("\n")}`;
      })
      .join("\n");
  }

  stop() {
    for (const p of this.procs) {
      if (p.child.exitCode === null && !p.child.signalCode) p.child.kill("SIGKILL");
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}
