import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

export default defineConfig({
  resolve: {
    // Tests run against the sources, built or not.
    alias: { "@mozaiks/client": fileURLToPath(new URL("./client/src/index.ts", import.meta.url)) },
  },
  test: {
    include: ["client/test/**/*.test.ts", "chatui-react/test/**/*.test.tsx"],
    environment: "node",
  },
});
