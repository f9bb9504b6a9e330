export {
  ChatWindow,
  ChildProgress,
  Composer,
  ConnectionStatus,
  InputRequest,
  MessageList,
  RunStatus,
  WorkflowPicker,
} from "./components.js";
export { type ChatUIConfig, ChatUIProvider, useChatUIConfig } from "./context.js";
export { apiOptions, type UseChat, type UseChatOptions, useChat, useWorkflows } from "./hooks.js";
