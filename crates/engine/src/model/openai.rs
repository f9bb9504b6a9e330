//! An OpenAI-compatible chat-completions client with streaming and tool calls.
//!
//! `POST {base}/chat/completions` with `stream: true` and `stream_options.include_usage`; the
//! answer is Server-Sent Events: `data: {chunk}` lines, then `data: [DONE]`. Content deltas are
//! concatenated (and pushed into the call's delta [`Sink`] as they arrive, see
//! [`super::deltas`]); tool-call deltas are assembled by `index` (the id and name come in the first
//! delta of a call, the arguments in pieces); usage comes in the last chunk. Works with OpenAI,
//! Azure OpenAI (`OPENAI_API_KEY_HEADER=api-key`, the deployment URL with `?api-version=` as the
//! base), vLLM, Ollama (`/v1`) and llama.cpp's server.
//!
//! 429, 5xx, connection errors, timeouts and streams cut short are retried with exponential
//! backoff (a `Retry-After` in seconds is honoured), up to `max_attempts`; other 4xx fail at
//! once. Errors carry a stable `code` and whether they were retryable.

use std::collections::BTreeMap;
use std::time::Duration;

use mozaiks_events::RequestedToolCall;
use serde_json::{Value, json};
use tracing::{debug, warn};

use super::ModelError;
use super::deltas::Sink;
use crate::chat::Reply;

/// Client settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// e.g. `https://api.openai.com/v1`; a query string (Azure's `api-version`) is kept.
    pub base_url: String,
    pub api_key: Option<String>,
    /// The header that carries the key: `None` sends `Authorization: Bearer KEY`; Azure uses
    /// `api-key`.
    pub api_key_header: Option<String>,
    /// The model of agents that do not name one.
    pub default_model: String,
    /// Tries per call, at least 1.
    pub max_attempts: u32,
    /// First backoff; doubles per attempt up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Whole request, including the streamed answer.
    pub request_timeout: Duration,
}

/// The default base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// The default model.
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";

impl Default for Config {
    fn default() -> Self {
        Config {
            base_url: DEFAULT_BASE_URL.into(),
            api_key: None,
            api_key_header: None,
            default_model: DEFAULT_MODEL.into(),
            max_attempts: 4,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            request_timeout: Duration::from_secs(120),
        }
    }
}

/// The client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    cfg: Config,
    http: reqwest::Client,
    url: String,
    /// `response_format` of the request (structured outputs), see [`Client::complete_structured`].
    response_format: Option<Box<Value>>,
}

fn err(code: &'static str, message: impl Into<String>, retryable: bool) -> ModelError {
    ModelError {
        code,
        message: message.into(),
        retryable,
    }
}

impl Client {
    pub fn new(cfg: Config) -> Result<Client, ModelError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .build()
            .map_err(|e| err("model_config", e.to_string(), false))?;
        let (path, query) = match cfg.base_url.split_once('?') {
            Some((p, q)) => (p, format!("?{q}")),
            None => (cfg.base_url.as_str(), String::new()),
        };
        let url = format!("{}/chat/completions{query}", path.trim_end_matches('/'));
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(err(
                "model_config",
                format!(
                    "OPENAI_BASE_URL must be an http(s) URL, got {:?}",
                    cfg.base_url
                ),
                false,
            ));
        }
        Ok(Client {
            cfg,
            http,
            url,
            response_format: None,
        })
    }

    pub fn default_model(&self) -> &str {
        &self.cfg.default_model
    }

    /// One chat completion: `messages` and `tools` in the API's shape.
    pub async fn complete(
        &self,
        model: &str,
        messages: Vec<Value>,
        tools: Vec<Value>,
    ) -> Result<Reply, ModelError> {
        self.complete_streaming(model, messages, tools, None).await
    }

    /// [`Client::complete`], pushing each content delta into `deltas` as it arrives (a retried
    /// attempt first pushes a restart).
    pub async fn complete_streaming(
        &self,
        model: &str,
        messages: Vec<Value>,
        tools: Vec<Value>,
        deltas: Option<&Sink>,
    ) -> Result<Reply, ModelError> {
        let mut body = json!({
            "model": model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if !tools.is_empty() {
            body["tools"] = Value::Array(tools);
        }
        if let Some(format) = &self.response_format {
            body["response_format"] = (**format).clone();
        }
        let attempts = self.cfg.max_attempts.max(1);
        let mut backoff = self.cfg.backoff;
        let mut attempt = 1;
        loop {
            if attempt > 1
                && let Some(sink) = deltas
            {
                sink.restart();
            }
            let (e, retry_after) = match self.attempt(&body, deltas).await {
                Ok(mut reply) => {
                    if reply.model.is_empty() {
                        reply.model = model.to_string();
                    }
                    return Ok(reply);
                }
                Err(failure) => failure,
            };
            if !e.retryable || attempt >= attempts {
                return Err(ModelError {
                    message: if e.retryable {
                        format!("{} (after {attempt} attempts)", e.message)
                    } else {
                        e.message
                    },
                    ..e
                });
            }
            let wait = retry_after.unwrap_or(backoff).min(Duration::from_secs(60));
            warn!(attempt, code = e.code, wait_ms = wait.as_millis() as u64, error = %e.message, "Model call failed; retrying.");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(self.cfg.max_backoff);
            attempt += 1;
        }
    }

    /// [`Client::complete_streaming`] with `response_format` in the request, e.g.
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict": true}}`.
    pub async fn complete_structured(
        &self,
        model: &str,
        messages: Vec<Value>,
        tools: Vec<Value>,
        response_format: Value,
        deltas: Option<&Sink>,
    ) -> Result<Reply, ModelError> {
        let client = Client {
            response_format: Some(Box::new(response_format)),
            ..self.clone()
        };
        client
            .complete_streaming(model, messages, tools, deltas)
            .await
    }

    /// One HTTP exchange. On failure, the error and the server's `Retry-After`.
    async fn attempt(
        &self,
        body: &Value,
        deltas: Option<&Sink>,
    ) -> Result<Reply, (ModelError, Option<Duration>)> {
        let mut req = self.http.post(&self.url).json(body);
        if let Some(key) = &self.cfg.api_key {
            req = match &self.cfg.api_key_header {
                Some(h) => req.header(h.as_str(), key.as_str()),
                None => req.bearer_auth(key),
            };
        }
        let mut resp = req.send().await.map_err(|e| (transport(&e), None))?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let text = resp.text().await.unwrap_or_default();
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(String::from))
                .unwrap_or_else(|| text.chars().take(300).collect());
            let message = format!("HTTP {}: {detail}", status.as_u16());
            let e = match status.as_u16() {
                401 | 403 => err("model_unauthorized", message, false),
                429 => err("model_rate_limited", message, true),
                s if s >= 500 => err("model_unavailable", message, true),
                _ => err("model_bad_request", message, false),
            };
            return Err((e, retry_after));
        }
        let mut stream = Sse {
            deltas: deltas.cloned(),
            ..Sse::default()
        };
        loop {
            match resp.chunk().await {
                Ok(Some(bytes)) => {
                    if stream.feed(&bytes).map_err(|e| (e, None))? {
                        break;
                    }
                }
                Ok(None) => {
                    if !stream.finished {
                        return Err((
                            err(
                                "model_incomplete",
                                "the stream ended before [DONE] or a finish_reason",
                                true,
                            ),
                            None,
                        ));
                    }
                    break;
                }
                Err(e) => return Err((transport(&e), None)),
            }
        }
        let prompt_estimate = super::tokens(&body["messages"].to_string());
        Ok(stream.reply(prompt_estimate))
    }
}

fn transport(e: &reqwest::Error) -> ModelError {
    if e.is_timeout() {
        err(
            "model_timeout",
            format!("the model did not answer in time: {e}"),
            true,
        )
    } else {
        err(
            "model_connection",
            format!("cannot reach the model: {e}"),
            true,
        )
    }
}

/// A tool call being assembled from deltas.
#[derive(Default, Debug)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

/// The state of one streamed answer.
#[derive(Default, Debug)]
pub(crate) struct Sse {
    buf: Vec<u8>,
    text: String,
    calls: BTreeMap<u64, PartialCall>,
    model: String,
    usage: Option<(u64, u64)>,
    /// A finish_reason or [DONE] was seen.
    finished: bool,
    /// Where content deltas go as they arrive.
    deltas: Option<Sink>,
}

impl Sse {
    /// Feeds bytes; `Ok(true)` once `[DONE]` arrived.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<bool, ModelError> {
        self.buf.extend_from_slice(bytes);
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim();
            let Some(data) = line.strip_prefix("data:") else {
                // Comments (`: keep-alive`), `event:`, `id:` and blank separators.
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                self.finished = true;
                return Ok(true);
            }
            self.chunk(data)?;
        }
        Ok(false)
    }

    fn chunk(&mut self, data: &str) -> Result<(), ModelError> {
        let v: Value = serde_json::from_str(data).map_err(|e| {
            err(
                "model_bad_stream",
                format!(
                    "a stream chunk is not JSON ({e}): {}",
                    data.chars().take(200).collect::<String>()
                ),
                false,
            )
        })?;
        if let Some(e) = v.get("error") {
            let message = e["message"].as_str().unwrap_or("unknown error").to_string();
            return Err(err("model_stream_error", message, true));
        }
        if let Some(m) = v["model"].as_str() {
            self.model = m.to_string();
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = Some((
                u["prompt_tokens"].as_u64().unwrap_or(0),
                u["completion_tokens"].as_u64().unwrap_or(0),
            ));
        }
        let Some(choice) = v["choices"].get(0) else {
            return Ok(());
        };
        if choice["finish_reason"].is_string() {
            self.finished = true;
        }
        let delta = &choice["delta"];
        if let Some(t) = delta["content"].as_str() {
            self.text.push_str(t);
            if let Some(sink) = &self.deltas {
                sink.text(t);
            }
        }
        if let Some(calls) = delta["tool_calls"].as_array() {
            for (n, c) in calls.iter().enumerate() {
                let index = c["index"].as_u64().unwrap_or(n as u64);
                let call = self.calls.entry(index).or_default();
                if let Some(id) = c["id"].as_str() {
                    call.id = id.to_string();
                }
                if let Some(name) = c["function"]["name"].as_str() {
                    call.name.push_str(name);
                }
                if let Some(a) = c["function"]["arguments"].as_str() {
                    call.arguments.push_str(a);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn reply(self, prompt_estimate: u64) -> Reply {
        let tool_calls = self
            .calls
            .into_iter()
            .map(|(i, c)| RequestedToolCall {
                call_id: if c.id.is_empty() {
                    format!("call_{i}")
                } else {
                    c.id
                },
                tool: c.name,
                // Arguments that are not JSON go to the tool as a string; it reports the error.
                arguments: if c.arguments.trim().is_empty() {
                    json!({})
                } else {
                    serde_json::from_str(&c.arguments).unwrap_or(Value::String(c.arguments))
                },
            })
            .collect();
        let (prompt_tokens, completion_tokens) = match self.usage {
            Some(u) => u,
            None => {
                debug!("The provider sent no usage; estimating tokens.");
                (prompt_estimate, super::tokens(&self.text))
            }
        };
        Reply {
            text: self.text,
            model: self.model,
            prompt_tokens,
            completion_tokens,
            tool_calls,
        }
    }
}
