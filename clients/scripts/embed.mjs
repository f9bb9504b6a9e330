// The chat page is embedded in the gateway binary from crates/gateway/assets/chat/ (committed).
// After `vite build`, this writes build-info.json there with a SHA-256 of the sources the page is
// built from; `--check` fails when the sources changed since (the gateway's test
// `page::tests::embedded_page_is_built_from_the_current_sources` checks the same hash).
//
// The hash (the Rust test computes it the same way): the files below, directories walked
// recursively, skipping `*.test.ts(x)` and client/src/generated/ (types only: they never change
// the built page, and a schema change should not need a rebuild), sorted by their path relative to clients/ ('/'-separated,
// byte order); for each: the path's bytes, a 0 byte, the content, a 0 byte.
import { createHash } from "node:crypto";
import { readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const clients = join(dirname(fileURLToPath(import.meta.url)), "..");
const assets = join(clients, "..", "crates", "gateway", "assets", "chat");
export const SOURCES = [
  "package-lock.json",
  "tsconfig.base.json",
  "client/package.json",
  "client/tsconfig.json",
  "client/src",
  "chatui-react/package.json",
  "chatui-react/tsconfig.json",
  "chatui-react/src",
  "page/package.json",
  "page/tsconfig.json",
  "page/index.html",
  "page/vite.config.ts",
  "page/src",
];

function walk(rel, out) {
  const abs = join(clients, rel);
  if (statSync(abs).isDirectory()) {
    for (const name of readdirSync(abs)) walk(`${rel}/${name}`, out);
  } else if (!/\.test\.tsx?$/.test(rel) && !rel.startsWith("client/src/generated/")) {
    out.push(rel);
  }
}

export function sourcesHash() {
  const files = [];
  for (const s of SOURCES) walk(s, files);
  files.sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
  const h = createHash("sha256");
  for (const f of files) {
    h.update(Buffer.from(f));
    h.update(Buffer.from([0]));
    h.update(readFileSync(join(clients, f)));
    h.update(Buffer.from([0]));
  }
  return { sha256: h.digest("hex"), files: files.length };
}

const info = join(assets, "build-info.json");
const { sha256, files } = sourcesHash();
if (process.argv.includes("--check")) {
  let recorded = "";
  try {
    recorded = JSON.parse(readFileSync(info, "utf8")).sources_sha256;
  } catch {
    // missing
  }
  if (recorded !== sha256) {
    console.error(
      "embed: crates/gateway/assets/chat is stale relative to clients/ sources; run `npm run build` in clients/ and commit it",
    );
    process.exit(1);
  }
  console.log(`embed: the embedded page is built from the current sources (${files} files)`);
} else {
  const text = `${JSON.stringify({ sources_sha256: sha256, files, built_by: "clients/scripts/embed.mjs" }, null, 2)}\n`;
  writeFileSync(info, text);
  console.log(`embed: wrote ${info} (${files} source files, sha256 ${sha256.slice(0, 12)}…)`);
}
