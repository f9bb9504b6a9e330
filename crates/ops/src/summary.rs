//! The optional summary of an incident (issue 12, item 6): a short summary and a suggested
//! playbook in the incident's `annotations` (`llm_summary`, `playbook`), written by the model the
//! workers use — the OpenAI-compatible client when `OPENAI_API_KEY` or `OPENAI_BASE_URL` is set,
//! else the built-in offline model, which writes them from the incident's numbers and a playbook
//! per rule. **The model never executes anything**: what it writes is text in the annotations;
//! the actions an incident takes come from the policy alone, decided before the model is asked.
//!
//! A model call that fails or takes longer than [`TIMEOUT`] leaves the annotations without a
//! summary; the incident is recorded all the same.

use std::time::Duration;

use mozaiks_engine::model::Model;
use serde_json::json;
use tracing::{debug, warn};

use crate::incident::Incident;

/// The longest an incident waits for its summary.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// The system prompt of the OpenAI-compatible model.
const SYSTEM: &str = "You assist the operator of a multi-tenant AI-agent runtime. Given one \
incident as JSON, answer in exactly this form:\nSUMMARY: <one or two sentences: what is happening \
and to which app>\nPLAYBOOK:\n1. <step>\n2. <step>\n3. <step>\nSuggest steps for a person; you \
cannot execute anything and must not claim that anything was done beyond the incident's actions.";

/// What the model wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub summary: String,
    pub playbook: String,
}

/// The offline playbook of a rule.
fn playbook(rule: &str, app: &str) -> String {
    let steps: [&str; 3] = match rule {
        "noisy_neighbour" => [
            "Look at the app's runs in progress: GET /health/active-runs?app_id={app}.",
            "Keep the throttle while it lasts; if the load is legitimate, propose raise_limits or a tier with its own runtime.",
            "If the runs look abusive, pause the app's runs (pause_runs) and contact its owner.",
        ],
        "error_spike" => [
            "Read the app's failed runs and tool errors: GET /metrics/perf/aggregate?app_id={app}.",
            "Check the tools and the model provider the app's workflows call.",
            "If one workflow fails, disable it for a while (disable_pack) and tell the app's owner.",
        ],
        "cost_spike" => [
            "Compare the app's token burn with its trailing hour: GET /api/usage/{app}.",
            "Check its credits: GET /api/apps/{app}/credits.",
            "Approve the proposed suspension only if the spend is not expected; otherwise reject it.",
        ],
        "socket_share" => [
            "Check the app's open WebSockets and clients for reconnect loops.",
            "Lower its max_websockets if the share is not expected.",
            "Move the app to a tier with its own runtime if the share is legitimate.",
        ],
        _ => [
            "Look at the fleet's run queue and workers: GET /metrics/perf/aggregate.",
            "Add workers if every worker is busy (MAX_CONCURRENT_WORKFLOWS reached).",
            "Check the model provider's latency.",
        ],
    };
    steps
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{}. {}", i + 1, s.replace("{app}", app)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Splits a model's `SUMMARY: … PLAYBOOK: …` answer (a free answer is all summary).
pub fn parse(text: &str) -> Summary {
    let text = text.trim();
    let (head, playbook) = match text.find("PLAYBOOK:") {
        Some(i) => (&text[..i], text[i + "PLAYBOOK:".len()..].trim()),
        None => (text, ""),
    };
    let summary = head.trim().trim_start_matches("SUMMARY:").trim();
    Summary {
        summary: summary.chars().take(600).collect(),
        playbook: playbook.chars().take(2000).collect(),
    }
}

/// The summary of `inc` by `model`, or `None` if the model failed or was too slow.
pub async fn summarize(model: &Model, inc: &Incident) -> Option<Summary> {
    match model {
        Model::Offline => Some(Summary {
            summary: format!(
                "{} ({} incident, {}).",
                inc.annotations.summary,
                inc.rule,
                serde_json::to_value(inc.severity)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            ),
            playbook: playbook(&inc.rule, &inc.app_id),
        }),
        Model::OpenAi(client) => {
            let facts = json!({
                "rule": inc.rule, "app_id": inc.app_id, "severity": inc.severity,
                "summary": inc.annotations.summary, "description": inc.annotations.description,
                "values": inc.values,
                "actions_taken": inc.actions.iter().map(|a| &a.kind).collect::<Vec<_>>(),
                "proposed_for_approval": inc.proposed.iter().map(|p| p.kind.as_str()).collect::<Vec<_>>(),
            });
            let messages = vec![
                json!({"role": "system", "content": SYSTEM}),
                json!({"role": "user", "content": facts.to_string()}),
            ];
            let call = client.complete(client.default_model(), messages, Vec::new());
            match tokio::time::timeout(TIMEOUT, call).await {
                Ok(Ok(reply)) => {
                    debug!(app_id = %inc.app_id, rule = %inc.rule, "Incident summarized by the model.");
                    Some(parse(&reply.text))
                }
                Ok(Err(e)) => {
                    warn!(app_id = %inc.app_id, error = %e, "The model could not summarize the incident.");
                    None
                }
                Err(_) => {
                    warn!(app_id = %inc.app_id, "The model did not summarize the incident in time.");
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_models_answer_splits_into_summary_and_playbook() {
        let s = parse("SUMMARY: App x floods the fleet.\nPLAYBOOK:\n1. Look.\n2. Wait.");
        assert_eq!(s.summary, "App x floods the fleet.");
        assert_eq!(s.playbook, "1. Look.\n2. Wait.");
        let free = parse("Something odd.");
        assert_eq!(free.summary, "Something odd.");
        assert_eq!(free.playbook, "");
    }

    #[test]
    fn the_offline_playbook_names_the_app() {
        let p = playbook("cost_spike", "acme");
        assert!(p.starts_with("1. "));
        assert!(p.contains("/api/apps/acme/credits"));
        assert_eq!(p.lines().count(), 3);
    }
}
