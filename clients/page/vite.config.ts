import { fileURLToPath } from "node:url";
import { defineConfig } from "vite";

// The page is embedded in the gateway binary and served at /chat: fixed file names (page.rs names
// them), one script and one stylesheet, nothing fetched from elsewhere at run time.
const out = fileURLToPath(new URL("../../crates/gateway/assets/chat", import.meta.url));

// `npm run dev`: the page with hot reload at http://127.0.0.1:5173/chat/#token=..., talking to the
// runtime at MOZAIKS_URL (default the one ./scripts/dev.sh runs).
const runtime = process.env.MOZAIKS_URL ?? "http://127.0.0.1:8000";

export default defineConfig({
  root: fileURLToPath(new URL(".", import.meta.url)),
  base: "/chat/",
  server: {
    host: "127.0.0.1",
    proxy: {
      "/api": runtime,
      "/ws": { target: runtime.replace(/^http/, "ws"), ws: true },
    },
  },
  build: {
    outDir: out,
    emptyOutDir: true,
    target: "es2022",
    sourcemap: false,
    modulePreload: false,
    cssCodeSplit: false,
    reportCompressedSize: false,
    rolldownOptions: {
      output: {
        entryFileNames: "assets/chat.js",
        chunkFileNames: "assets/chat-[name].js",
        assetFileNames: "assets/chat[extname]",
      },
    },
  },
});
