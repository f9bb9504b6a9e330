//! HTTP tools: the only tools with I/O (built-in and lookup tools are pure, in the aggregate).
//! Every failure is a result (`Err(text)`) that becomes a `tool.result` with `error`.

use std::time::Duration;

use mozaiks_packs::{HttpMethod, HttpTool};
use serde_json::Value;

/// Largest answer body kept, in bytes.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;

/// Calls an HTTP tool with `arguments`.
pub async fn call_http(
    http: &reqwest::Client,
    tool: &HttpTool,
    arguments: &Value,
) -> Result<Value, String> {
    let Value::Object(args) = arguments else {
        return Err(format!("arguments must be a JSON object, got {arguments}"));
    };
    let method = match tool.method {
        HttpMethod::Get => reqwest::Method::GET,
        HttpMethod::Post => reqwest::Method::POST,
        HttpMethod::Put => reqwest::Method::PUT,
        HttpMethod::Patch => reqwest::Method::PATCH,
        HttpMethod::Delete => reqwest::Method::DELETE,
    };
    let mut req = http
        .request(method, &tool.url)
        .timeout(Duration::from_millis(tool.timeout_ms));
    for (k, v) in &tool.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    req = match tool.method {
        HttpMethod::Get | HttpMethod::Delete => {
            let query: Vec<(String, String)> = args
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), v)
                })
                .collect();
            req.query(&query)
        }
        _ => req.json(arguments),
    };
    let resp = req.send().await.map_err(|e| describe(&e, tool))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| describe(&e, tool))?;
    let body = &body[..body.len().min(MAX_RESULT_BYTES)];
    let text = String::from_utf8_lossy(body).to_string();
    if !status.is_success() {
        let snippet: String = text.chars().take(300).collect();
        return Err(format!("HTTP {}: {snippet}", status.as_u16()));
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn describe(e: &reqwest::Error, tool: &HttpTool) -> String {
    if e.is_timeout() {
        format!("timed out after {} ms", tool.timeout_ms)
    } else {
        format!("request failed: {e}")
    }
}

/// Who a plugin tool runs for: the chat's app and user (the same `_context` as
/// `POST /api/execute/{plugin}`, with the tool call's id as `request_id`).
pub struct PluginTarget<'a> {
    pub app_id: &'a str,
    pub user_id: &'a str,
    pub chat_id: &'a str,
    pub call_id: &'a str,
    pub plugin: &'a str,
}

/// Runs a pack tool declared `plugin: <name>`: the arguments are the plugin's input, its JSON
/// answer the result; every refusal, trap or limit is a tool error with the plugin's code.
pub async fn call_plugin(
    plugins: Option<&mozaiks_plugins::Plugins>,
    registry: &mozaiks_control::Registry,
    target: PluginTarget<'_>,
    arguments: Value,
) -> Result<Value, String> {
    let Some(plugins) = plugins else {
        return Err("plugins are not enabled on this worker".into());
    };
    let Some(app) = registry.get(target.app_id) else {
        return Err(format!(
            "app {:?} is not known to this worker",
            target.app_id
        ));
    };
    let call = mozaiks_plugins::Call {
        app_id: target.app_id.to_string(),
        tier: app.tier.clone(),
        user_id: target.user_id.to_string(),
        roles: Vec::new(),
        request_id: target.call_id.to_string(),
        plugin: target.plugin.to_string(),
        input: arguments,
        via: mozaiks_plugins::Via::Tool,
        chat_id: Some(target.chat_id.to_string()),
    };
    match plugins.execute(call).await {
        Ok(done) => Ok(done.output),
        Err(e) => Err(format!("{}: {}", e.code(), e.message())),
    }
}
