import type { SocketFactory, TicketProvider, TokenSource } from "@mozaiks/client";
import { createContext, type ReactNode, useContext } from "react";

/** The seeds' configuration shape: `<ChatUIProvider config={{ api: { baseUrl }, ws: { baseUrl }, chat: { defaultAppId } }}>`. */
export interface ChatUIConfig {
  api: {
    /** The runtime's HTTP base URL (the broker), one or several replicas. */
    baseUrl: string | string[];
  };
  ws?: {
    /** WebSocket base URL(s) to use instead of the ticket's (`wss://chat.example.com`, or a list of replicas). */
    baseUrl?: string | string[];
  };
  chat: {
    /** The app whose workflows the chat runs. */
    defaultAppId: string;
    /** The workflow a new chat runs when none is picked. */
    defaultWorkflow?: string;
  };
  auth?: {
    /** The user's JWT (or a function returning a current one): tickets come from the broker. */
    token?: TokenSource;
  };
  /** Instead of `auth.token`: tickets from the app's back-end, which calls the broker with its API key. */
  getTicket?: TicketProvider;
  /** Sockets other than the browser's `WebSocket` (tests, Node). */
  createSocket?: SocketFactory;
}

const Ctx = createContext<ChatUIConfig | null>(null);

export function ChatUIProvider({ config, children }: { config: ChatUIConfig; children?: ReactNode }) {
  return <Ctx.Provider value={config}>{children}</Ctx.Provider>;
}

/** The provider's configuration (throws outside a `ChatUIProvider`). */
export function useChatUIConfig(): ChatUIConfig {
  const c = useContext(Ctx);
  if (!c) throw new Error("useChat and the ChatUI components need a <ChatUIProvider config={...}>");
  return c;
}
