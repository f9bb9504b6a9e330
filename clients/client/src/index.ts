export { type BackoffOptions, backoffDelay } from "./backoff.js";
export {
  ApiError,
  type ApiOptions,
  apiCall,
  brokerTickets,
  fetchTranscript,
  listWorkflows,
  type TokenSource,
} from "./broker.js";
export {
  ChatClient,
  type ChatClientEvents,
  type ChatClientOptions,
  type ChatClientStats,
  CloseCode,
  MAX_FRAME_BYTES,
  MAX_TEXT_BYTES,
} from "./client.js";
export { DeltaText } from "./deltas.js";
export { Emitter } from "./emitter.js";
export { randomId } from "./ids.js";
export type * from "./types.js";
export {
  type AssistantItem,
  type ChatItem,
  type ChatView,
  type ChildInfo,
  type ChildrenItem,
  type InputItem,
  type NoticeItem,
  type RunState,
  type RunStatus,
  type ToolItem,
  Transcript,
  type UserItem,
} from "./view.js";
