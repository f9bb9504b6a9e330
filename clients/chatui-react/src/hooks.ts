import {
  type ApiOptions,
  ChatClient,
  type ChatView,
  type ConnectionState,
  type ErrorData,
  listWorkflows,
  type WorkflowInfo,
} from "@mozaiks/client";
import { useCallback, useEffect, useRef, useState } from "react";
import { type ChatUIConfig, useChatUIConfig } from "./context.js";

export interface UseChatOptions {
  /** The workflow of a new chat (default: the config's `chat.defaultWorkflow`). */
  workflow?: string;
  /** Default: the config's `chat.defaultAppId`. */
  appId?: string;
  /** Resume this chat: connects at once. */
  chatId?: string;
  /** Context variables of a new chat. */
  context?: Record<string, unknown>;
  /** Called once the chat has an id (a new chat's first ticket). */
  onChatId?: (chatId: string) => void;
}

export interface UseChat {
  view: ChatView;
  connection: ConnectionState;
  chatId: string | undefined;
  workflow: string | undefined;
  /** Starts (or resumes) the chat; a new chat runs `workflow` (or the hook's). */
  start: (workflow?: string) => Promise<string | undefined>;
  /** Sends a user message (starting the chat first if needed); returns its `client_msg_id`. */
  sendMessage: (text: string) => string;
  respond: (requestId: string, text: string) => void;
  cancel: (reason?: string) => void;
  /** Closes the chat and forgets it: the next message starts a new one. */
  reset: () => void;
  /** The last `error` frame (a refused message or answer), until the next message is sent. */
  error: ErrorData | undefined;
  /** The underlying client (null before the chat starts). */
  client: ChatClient | null;
}

const EMPTY: ChatView = { lastSeq: 0, items: [], run: { status: "idle" }, context: {} };
const IDLE: ConnectionState = { status: "idle", attempt: 0 };

/** The API options of the config, when it has a user token. */
export function apiOptions(config: ChatUIConfig): ApiOptions | undefined {
  const token = config.auth?.token;
  if (token === undefined) return undefined;
  return { baseUrl: config.api.baseUrl, token };
}

/** One chat: its view, its connection, and what a user can do in it. */
export function useChat(opts: UseChatOptions = {}): UseChat {
  const config = useChatUIConfig();
  const [client, setClient] = useState<ChatClient | null>(null);
  const [view, setView] = useState<ChatView>(EMPTY);
  const [connection, setConnection] = useState<ConnectionState>(IDLE);
  const [error, setError] = useState<ErrorData | undefined>();
  const [chatId, setChatId] = useState<string | undefined>(opts.chatId);
  const [workflow, setWorkflow] = useState<string | undefined>(opts.workflow ?? config.chat.defaultWorkflow);
  const clientRef = useRef<ChatClient | null>(null);
  const onChatId = useRef(opts.onChatId);
  onChatId.current = opts.onChatId;

  useEffect(() => {
    if (!clientRef.current) setWorkflow(opts.workflow ?? config.chat.defaultWorkflow);
  }, [opts.workflow, config.chat.defaultWorkflow]);

  const make = useCallback(
    (wf: string | undefined, resume: string | undefined): ChatClient => {
      if (!wf) throw new Error("pick a workflow first");
      const token = config.auth?.token;
      const c = new ChatClient({
        appId: opts.appId ?? config.chat.defaultAppId,
        workflowName: wf,
        ...(resume ? { chatId: resume } : {}),
        ...(opts.context ? { context: opts.context } : {}),
        apiBaseUrl: config.api.baseUrl,
        ...(token !== undefined ? { token } : {}),
        ...(config.getTicket ? { getTicket: config.getTicket } : {}),
        ...(config.ws?.baseUrl ? { wsBaseUrl: config.ws.baseUrl } : {}),
        ...(config.createSocket ? { createSocket: config.createSocket } : {}),
      });
      c.on("view", setView);
      c.on("state", setConnection);
      c.on("error", setError);
      c.on("ticket", (t) => {
        setChatId(t.chat_id);
        onChatId.current?.(t.chat_id);
      });
      clientRef.current = c;
      setClient(c);
      setWorkflow(wf);
      return c;
    },
    [config, opts.appId, opts.context],
  );

  const start = useCallback(
    async (wf?: string) => {
      const c = clientRef.current ?? make(wf ?? workflow, chatId);
      try {
        return await c.start();
      } catch {
        return undefined;
      }
    },
    [make, workflow, chatId],
  );

  // Resuming a chat connects at once.
  const resumeId = opts.chatId;
  const resumeWorkflow = opts.workflow;
  useEffect(() => {
    if (!resumeId || clientRef.current) return;
    const c = make(resumeWorkflow ?? config.chat.defaultWorkflow, resumeId);
    c.start().catch(() => undefined);
  }, [resumeId, resumeWorkflow, make, config.chat.defaultWorkflow]);

  useEffect(
    () => () => {
      clientRef.current?.close();
      clientRef.current = null;
    },
    [],
  );

  const sendMessage = useCallback(
    (text: string) => {
      let c = clientRef.current;
      if (!c) {
        c = make(workflow, chatId);
        c.start().catch(() => undefined);
      }
      setError(undefined);
      return c.sendMessage(text);
    },
    [make, workflow, chatId],
  );

  const respond = useCallback((requestId: string, text: string) => clientRef.current?.respond(requestId, text), []);
  const cancel = useCallback((reason?: string) => clientRef.current?.cancel(reason), []);
  const reset = useCallback(() => {
    clientRef.current?.close();
    clientRef.current = null;
    setClient(null);
    setView(EMPTY);
    setConnection(IDLE);
    setChatId(undefined);
    setError(undefined);
  }, []);

  return { view, connection, chatId, workflow, start, sendMessage, respond, cancel, reset, error, client };
}

/** The workflows the user's app may run (`GET /api/workflows`). */
export function useWorkflows(): { workflows: WorkflowInfo[]; error: string | undefined; loading: boolean } {
  const config = useChatUIConfig();
  const [workflows, setWorkflows] = useState<WorkflowInfo[]>([]);
  const [error, setError] = useState<string | undefined>();
  const [loading, setLoading] = useState(true);
  const token = config.auth?.token;
  const key = `${JSON.stringify(config.api.baseUrl)} ${typeof token === "string" ? token : ""}`;
  // biome-ignore lint/correctness/useExhaustiveDependencies: refetch only when the base URL or token changes
  useEffect(() => {
    const api = apiOptions(config);
    if (!api) {
      setLoading(false);
      return;
    }
    let live = true;
    listWorkflows(api)
      .then((w) => live && setWorkflows(w))
      .catch((e: unknown) => live && setError(String((e as Error).message ?? e)))
      .finally(() => live && setLoading(false));
    return () => {
      live = false;
    };
  }, [key]);
  return { workflows, error, loading };
}
