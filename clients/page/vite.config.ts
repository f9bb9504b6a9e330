import { fileURLToPath } from "node:url";
import { defineConfig } from "vite";

// The page is embedded in the gateway binary and served at /chat: fixed file names (page.rs names
// them), one script and one stylesheet, nothing fetched from elsewhere at run time.
const out = fileURLToPath(new URL("../../crates/gateway/assets/chat", import.meta.url));

export default defineConfig({
  root: fileURLToPath(new URL(".", import.meta.url)),
  base: "/chat/",
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
