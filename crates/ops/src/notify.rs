//! The `notify` action: a POST of the incident to the policy's webhook, in Slack's
//! (`{"text": ...}`) or Alertmanager's webhook format (`version: "4"`, `status`, `alerts`).

use std::time::Duration;

use serde_json::{Value, json};

use crate::incident::{Incident, Status};
use crate::policy::NotifyFormat;

/// The webhook body of `incident` in `format`.
pub fn body(incident: &Incident, format: NotifyFormat, source: &str) -> Value {
    let status = match incident.status {
        Status::Firing => "firing",
        Status::Resolved => "resolved",
    };
    match format {
        NotifyFormat::Slack => json!({
            "text": format!(
                "[{}] {} ({}): {} — {}",
                status.to_uppercase(),
                incident.rule,
                incident.app_id,
                incident.annotations.summary,
                incident.annotations.description
            ),
        }),
        NotifyFormat::Alertmanager => {
            let mut labels = incident.labels.clone();
            labels.insert("alertname".into(), incident.rule.clone());
            json!({
                "version": "4",
                "groupKey": incident.fingerprint,
                "status": status,
                "receiver": "mozaiks-ops",
                "groupLabels": {"alertname": incident.rule},
                "commonLabels": labels,
                "commonAnnotations": incident.annotations,
                "externalURL": source,
                "alerts": [{
                    "status": status,
                    "labels": labels,
                    "annotations": incident.annotations,
                    "startsAt": incident.starts_at,
                    "endsAt": incident.ends_at,
                    "fingerprint": incident.fingerprint,
                }],
            })
        }
    }
}

/// POSTs the body; `Err` says why it was not delivered.
pub async fn send(http: &reqwest::Client, url: &str, body: &Value) -> Result<(), String> {
    let resp = http
        .post(url)
        .timeout(Duration::from_secs(5))
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("webhook answered {}", resp.status()))
    }
}
