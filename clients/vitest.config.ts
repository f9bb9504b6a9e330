import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["client/test/**/*.test.ts", "chatui-react/test/**/*.test.ts"],
    environment: "node",
  },
});
