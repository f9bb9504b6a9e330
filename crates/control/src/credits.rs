//! Every app's wallet as billing last computed it, followed in memory by every gateway and
//! worker: the KV bucket `MZ_CREDITS` (key `app_id`, a JSON [`Wallet`]), written only by billing.
//!
//! With `MONETIZATION_ENABLED=true` (read by the binary's configuration and passed to
//! [`Wallets::open`] as `enforce`) a gateway refuses a new session
//! and a message that would start a run, and a worker refuses the next model call, of an app whose
//! wallet is `blocked` (or of a user over the app's daily budget), from this copy: a map lookup,
//! no database round trip. A charge that exhausts the balance reaches every replica as fast as
//! billing writes the bucket (the watch pushes the new value; no polling). When the flag is off
//! (the development default) everything is metered and nothing is refused.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use mozaiks_bus::Bus;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::Error;
use crate::app::Overage;
use mozaiks_events::credits::CreditGrant;

/// The bucket of wallets.
pub const BUCKET: &str = "MZ_CREDITS";

/// Refusal codes (HTTP 402 and `error` frames).
pub const CREDITS_EXHAUSTED: &str = "credits_exhausted";
pub const USER_BUDGET_EXHAUSTED: &str = "user_budget_exhausted";

/// How an app stands in its period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalletState {
    #[default]
    Ok,
    /// 80 % of the period's credits (included + granted) are used, or the app is in overage.
    Low,
    /// Spending is refused (no balance left, or the overage limit is reached).
    Exhausted,
}

impl WalletState {
    pub fn as_str(&self) -> &'static str {
        match self {
            WalletState::Ok => "ok",
            WalletState::Low => "low",
            WalletState::Exhausted => "exhausted",
        }
    }
}

/// An app's credits in the current period, as billing computed them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Wallet {
    pub app_id: String,
    /// The period's key (its start as `YYYYMMDDTHHMMSSZ`).
    pub period: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// The tier's (or the app's own) included credits for this period.
    pub included: u64,
    /// Unspent credits of the grants usable in this period (before this period's consumption
    /// beyond `included`).
    pub granted: u64,
    /// Credits consumed in this period (Σ cost of the period's charges, each once).
    pub consumed: u64,
    /// `included + granted - consumed`; negative in overage.
    pub balance: i64,
    /// Credits spent past the balance (`-balance` when negative).
    pub overage: u64,
    pub overage_policy: Overage,
    pub overage_limit: u64,
    pub state: WalletState,
    /// Whether spending is refused (`state == exhausted`).
    pub blocked: bool,
    /// The UTC day of `users_over_budget` (`YYYYMMDD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    /// Users whose consumption today reached the app's `user_daily_credits`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users_over_budget: Vec<String>,
    /// Alerts already sent this period (`credits.low`, `credits.exhausted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
    /// When the next grant usable now expires (the wallet is recomputed then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_expiry: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

impl Wallet {
    /// Whether this wallet describes the period containing `now` (a wallet of a period that
    /// ended refuses nothing until billing writes the new period's).
    pub fn is_current(&self, now: DateTime<Utc>) -> bool {
        self.period_start <= now && now < self.period_end
    }
}

/// Why spending is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the app's credits for this period are spent")]
    CreditsExhausted,
    #[error("this user's daily credit budget is spent")]
    UserBudgetExhausted,
}

impl Refusal {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::CreditsExhausted => CREDITS_EXHAUSTED,
            Refusal::UserBudgetExhausted => USER_BUDGET_EXHAUSTED,
        }
    }
}

/// The replica's copy of every wallet, kept current by a watch of `MZ_CREDITS`. Cheap to clone.
#[derive(Clone)]
pub struct Wallets {
    kv: kv::Store,
    wallets: Arc<RwLock<HashMap<String, Arc<Wallet>>>>,
    enforce: bool,
}

impl Wallets {
    /// Opens `MZ_CREDITS`, loads every wallet and follows changes in the background; refusals
    /// are enforced when `enforce` (`MONETIZATION_ENABLED`), else only reported.
    pub async fn open(bus: &Bus, enforce: bool) -> Result<Wallets, Error> {
        let unavailable = |e: String| Error::Unavailable(format!("{BUCKET}: {e}"));
        let kv = bus
            .jetstream()
            .get_key_value(bus.subjects().name(BUCKET))
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let w = Wallets {
            kv,
            wallets: Arc::default(),
            enforce,
        };
        let mut watch =
            w.kv.watch_with_history(">")
                .await
                .map_err(|e| unavailable(e.to_string()))?;
        let has_values =
            w.kv.status()
                .await
                .map(|s| s.values() > 0)
                .map_err(|e| unavailable(e.to_string()))?;
        if has_values {
            let load = async {
                while let Some(entry) = watch.next().await {
                    let e = entry.map_err(|e| unavailable(e.to_string()))?;
                    let done = e.delta == 0 || e.seen_current;
                    w.observe(e);
                    if done {
                        break;
                    }
                }
                Ok::<(), Error>(())
            };
            tokio::time::timeout(Duration::from_secs(10), load)
                .await
                .map_err(|_| unavailable("wallets did not load within 10 s".into()))??;
        }
        let (follower, bus) = (w.clone(), bus.clone());
        tokio::spawn(async move {
            bus.follow_bucket(BUCKET, Some(watch), |e| follower.observe(e))
                .await
        });
        Ok(w)
    }

    fn observe(&self, e: kv::Entry) {
        let mut map = self.wallets.write().unwrap_or_else(PoisonError::into_inner);
        match e.operation {
            kv::Operation::Put => match serde_json::from_slice::<Wallet>(&e.value) {
                // The watch hands entries in the bucket's order (billing writes with
                // compare-and-set), so the last one is the newest.
                Ok(w) => {
                    map.insert(e.key.clone(), Arc::new(w));
                }
                Err(err) => {
                    warn!(app_id = %e.key, error = %err, "Ignoring a wallet that does not parse.")
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                map.remove(&e.key);
            }
        }
    }

    /// Whether refusals are enforced (`MONETIZATION_ENABLED`).
    pub fn enforcing(&self) -> bool {
        self.enforce
    }

    /// The bucket (billing writes it).
    pub fn bucket(&self) -> &kv::Store {
        &self.kv
    }

    /// The app's wallet as this replica last saw it.
    pub fn get(&self, app_id: &str) -> Option<Arc<Wallet>> {
        self.wallets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app_id)
            .cloned()
    }

    /// Whether `user_id` of `app_id` may spend now, whatever the flag says (see
    /// [`Wallets::check`]).
    pub fn may_spend(&self, app_id: &str, user_id: &str) -> Result<(), Refusal> {
        let Some(w) = self.get(app_id) else {
            return Ok(());
        };
        let now = Utc::now();
        if !w.is_current(now) {
            return Ok(());
        }
        if w.blocked {
            return Err(Refusal::CreditsExhausted);
        }
        if w.users_over_budget.iter().any(|u| u == user_id)
            && w.day.as_deref() == Some(now.format("%Y%m%d").to_string().as_str())
        {
            return Err(Refusal::UserBudgetExhausted);
        }
        Ok(())
    }

    /// The refusal to answer when enforcement is on and `user_id` of `app_id` may not spend;
    /// `Ok` when enforcement is off (metered, never refused).
    pub fn check(&self, app_id: &str, user_id: &str) -> Result<(), Refusal> {
        if !self.enforce {
            return Ok(());
        }
        self.may_spend(app_id, user_id)
    }
}

/// What appending a grant did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// This grant is on the log now.
    New(CreditGrant),
    /// A grant with the same idempotency key was there already: this one (the first).
    Existing(CreditGrant),
}

/// Appends `grant` to `MZ_BILLING` once per idempotency key: on its key's subject, expecting no
/// message there before. A second grant with the key (any replica, any time) is refused by the
/// server and answered with the first.
pub async fn append_grant(bus: &Bus, grant: &CreditGrant) -> Result<Appended, Error> {
    let unavailable = |e: String| Error::Unavailable(format!("MZ_BILLING: {e}"));
    let subject = bus.subjects().credit_grant(
        &grant.app_id,
        &mozaiks_events::credits::grant_key_token(&grant.idempotency_key),
    );
    let payload = serde_json::to_vec(grant).map_err(|e| unavailable(e.to_string()))?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", grant.grant_id.as_str());
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let ack = bus
        .jetstream()
        .publish_with_headers(subject.clone(), headers, payload.into())
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .await;
    match ack {
        Ok(_) => Ok(Appended::New(grant.clone())),
        Err(e) if mozaiks_bus::wrong_last_sequence(&e) => {
            let stream = bus
                .jetstream()
                .get_stream(bus.subjects().name("MZ_BILLING"))
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let first = stream
                .direct_get_first_for_subject(subject)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let first: CreditGrant = serde_json::from_slice(&first.payload)
                .map_err(|e| unavailable(format!("a grant does not parse: {e}")))?;
            Ok(Appended::Existing(first))
        }
        Err(e) => Err(unavailable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wallets_read_as_written_and_old_ones_tolerate_new_fields() {
        let now = Utc::now();
        let w = Wallet {
            app_id: "a".into(),
            period: "20261201T000000Z".into(),
            period_start: now - chrono::Duration::days(1),
            period_end: now + chrono::Duration::days(1),
            included: 10,
            granted: 5,
            consumed: 16,
            balance: -1,
            overage: 1,
            overage_policy: Overage::Allow,
            overage_limit: 100,
            state: WalletState::Low,
            blocked: false,
            day: None,
            users_over_budget: vec![],
            alerts: vec![],
            next_expiry: None,
            updated_at: now,
        };
        let text = serde_json::to_string(&w).unwrap();
        assert!(text.contains(r#""state":"low""#), "{text}");
        assert!(text.contains(r#""overage_policy":"allow""#), "{text}");
        let back: Wallet = serde_json::from_str(&text).unwrap();
        assert_eq!(back, w);
        assert!(w.is_current(now));
        assert!(!w.is_current(now + chrono::Duration::days(2)));
        assert_eq!(Refusal::CreditsExhausted.code(), "credits_exhausted");
        assert_eq!(Refusal::UserBudgetExhausted.code(), "user_budget_exhausted");
    }
}
