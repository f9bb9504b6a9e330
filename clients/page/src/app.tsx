import {
  type ChatUIConfig,
  ChatUIProvider,
  ChatWindow,
  useChat,
  useWorkflows,
  WorkflowPicker,
} from "@mozaiks/chatui-react";
import type { ChatClient } from "@mozaiks/client";
import { useEffect, useMemo, useState } from "react";
import { claimsOf, type PageParams, readParams, writeParams } from "./token.js";

declare global {
  interface Window {
    /** The page's chat client, for tests and debugging in the console. */
    mozaiksChat?: ChatClient | null;
  }
}

function NoToken() {
  return (
    <main className="page">
      <h1>Mozaiks chat</h1>
      <p>
        Open this page with a user token in its fragment: <code>/chat#token=&lt;user token&gt;</code>. The fragment
        never leaves the browser.
      </p>
      <p>
        A development token: <code>MOZAIKS_DEV=1 mozaiks token --sub alice --roles user</code> (
        <code>./scripts/dev.sh</code> prints the page's URL with one).
      </p>
    </main>
  );
}

function Chat({ params, setParams }: { params: PageParams; setParams: (p: PageParams) => void }) {
  const { workflows, error, loading } = useWorkflows();
  const [picked, setPicked] = useState<string | undefined>(params.workflow);
  const chat = useChat({
    ...(picked ? { workflow: picked } : {}),
    ...(params.chat ? { chatId: params.chat } : {}),
    onChatId: (id) => setParams({ ...params, workflow: picked ?? params.workflow, chat: id }),
  });
  useEffect(() => {
    window.mozaiksChat = chat.client;
  }, [chat.client]);
  useEffect(() => {
    if (!picked && workflows.length > 0) setPicked(workflows[0]?.name);
  }, [picked, workflows]);
  const started = chat.chatId !== undefined || chat.client !== null;
  return (
    <main className="page">
      <header className="page-head">
        <h1>Mozaiks chat</h1>
        <WorkflowPicker workflows={workflows} value={picked} onChange={setPicked} disabled={started} />
        {started && (
          <button
            type="button"
            className="page-new"
            data-testid="new-chat"
            onClick={() => {
              chat.reset();
              const { chat: _c, ...rest } = params;
              setParams(rest);
            }}
          >
            New chat
          </button>
        )}
      </header>
      {loading && <p className="page-meta">Loading workflows…</p>}
      {error && (
        <p className="page-error" role="alert">
          {error}
        </p>
      )}
      {chat.chatId && (
        <p className="page-meta" data-testid="chat-id">
          chat <code>{chat.chatId}</code>
        </p>
      )}
      <ChatWindow chat={chat} title={picked ? `Chat with ${picked}` : "Chat"} />
    </main>
  );
}

export function App() {
  const [params, setParamsState] = useState<PageParams>(() => readParams(window.location.hash));
  const setParams = (p: PageParams) => {
    setParamsState(p);
    // Replace (not push): a reload resumes the same chat; Back leaves the page.
    window.history.replaceState(null, "", writeParams(p));
  };
  const token = params.token;
  const config = useMemo<ChatUIConfig | null>(() => {
    if (!token) return null;
    const claims = claimsOf(token);
    return {
      api: { baseUrl: window.location.origin },
      chat: { defaultAppId: claims.app_id ?? "default" },
      auth: { token },
    };
  }, [token]);
  if (!config) return <NoToken />;
  return (
    <ChatUIProvider config={config}>
      <Chat params={params} setParams={setParams} />
    </ChatUIProvider>
  );
}
