//! Model prices from `config/prices.yaml` (embedded at build time, or `MOZAIKS_PRICES_FILE`):
//! credits per million prompt tokens and per million completion tokens, per model, with a
//! default for models the file does not name.
//!
//! A charge is costed once, by the worker that appends its `usage.charged`, at the price in force
//! then ([`Prices::cost`]); the event records the cost and the price, so changing the file never
//! re-prices the past.

use std::collections::BTreeMap;
use std::path::Path;

use mozaiks_events::{ChargePrice, UsageCharged};
use serde::Deserialize;

/// The prices file shipped with the binary.
pub const EMBEDDED: &str = include_str!("../../../config/prices.yaml");

/// The configuration's environment variable naming another prices file (read by the binary).
pub const PRICES_FILE_ENV: &str = "MOZAIKS_PRICES_FILE";

/// The highest price accepted, in credits per million tokens (a typo guard: a thousand times
/// the dearest model of 2026 in micro-dollars).
pub const MAX_PRICE: u64 = 1_000_000_000_000;

/// A prices file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid prices file {file}: {reason}")]
pub struct Error {
    pub file: String,
    pub reason: String,
}

/// One model's price.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Credits per million prompt tokens.
    pub prompt: u64,
    /// Credits per million completion tokens.
    pub completion: u64,
}

impl From<Price> for ChargePrice {
    fn from(p: Price) -> ChargePrice {
        ChargePrice {
            prompt: p.prompt,
            completion: p.completion,
        }
    }
}

/// Every model's price.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// The price of a model the file does not name.
    pub default: Price,
    #[serde(default)]
    pub models: BTreeMap<String, Price>,
}

impl Default for Prices {
    /// The embedded file (which is checked by a test, so this cannot fail).
    fn default() -> Prices {
        Prices::parse("config/prices.yaml (embedded)", EMBEDDED).expect("the embedded prices")
    }
}

impl Prices {
    /// `file` (the configuration's `MOZAIKS_PRICES_FILE`) if given, else the embedded file.
    pub fn load(file: Option<&Path>) -> Result<Prices, Error> {
        match file {
            Some(path) if !path.as_os_str().is_empty() => Prices::from_file(path),
            _ => Prices::parse("config/prices.yaml (embedded)", EMBEDDED),
        }
    }

    pub fn from_file(path: &Path) -> Result<Prices, Error> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        Prices::parse(&file, &text)
    }

    /// Parses and validates a prices file; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Prices, Error> {
        let bad = |reason: String| Error {
            file: file.to_string(),
            reason,
        };
        let prices: Prices = serde_norway::from_str(text).map_err(|e| bad(e.to_string()))?;
        let check = |what: &str, p: &Price| {
            for (field, v) in [("prompt", p.prompt), ("completion", p.completion)] {
                if v > MAX_PRICE {
                    return Err(bad(format!(
                        "{what}.{field} is {v} credits per million tokens; at most {MAX_PRICE}"
                    )));
                }
            }
            Ok(())
        };
        check("default", &prices.default)?;
        for (model, p) in &prices.models {
            if model.trim().is_empty() || model.len() > 256 || model.chars().any(char::is_control) {
                return Err(bad(format!(
                    "model name {model:?} must be 1 to 256 printable characters"
                )));
            }
            check(&format!("models.{model}"), p)?;
        }
        Ok(prices)
    }

    /// The price of `model` (the default for a model the file does not name).
    pub fn price(&self, model: &str) -> Price {
        self.models.get(model).copied().unwrap_or(self.default)
    }

    /// What `prompt_tokens` and `completion_tokens` of `model` cost, in credits (rounded up).
    pub fn cost(&self, model: &str, prompt_tokens: u64, completion_tokens: u64) -> u64 {
        ChargePrice::from(self.price(model)).cost(prompt_tokens, completion_tokens)
    }

    /// Costs a charge that has no cost yet, at the current price; a charge already costed keeps
    /// its cost and price (a charge is costed once).
    pub fn cost_charge(&self, u: &mut UsageCharged) {
        if u.credits.is_some() {
            return;
        }
        let price = ChargePrice::from(self.price(&u.model));
        u.credits = Some(price.cost(u.prompt_tokens, u.completion_tokens));
        u.price = Some(price);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_prices_parse_and_price_the_offline_model() {
        let p = Prices::parse("embedded", EMBEDDED).unwrap();
        assert_eq!(Prices::default(), p);
        // The offline model is priced, so everything is testable offline: one credit a token.
        assert!(p.models.contains_key("mozaiks-offline-1"));
        assert_eq!(p.cost("mozaiks-offline-1", 10, 5), 15);
        // A model the file does not name gets the default.
        assert_eq!(p.price("no-such-model"), p.default);
    }

    #[test]
    fn a_cost_is_rounded_up_and_never_overflows() {
        let p = Price {
            prompt: 150_000,
            completion: 600_000,
        };
        let c = ChargePrice::from(p);
        assert_eq!(c.cost(0, 0), 0);
        // 10 × 0.15 + 1 × 0.6 = 2.1 credits → 3.
        assert_eq!(c.cost(10, 1), 3);
        assert_eq!(c.cost(1_000_000, 1_000_000), 750_000);
        let dear = ChargePrice {
            prompt: MAX_PRICE,
            completion: MAX_PRICE,
        };
        assert_eq!(dear.cost(u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn a_charge_is_costed_once() {
        let p = Prices::default();
        let mut u = UsageCharged {
            run_id: uuid::Uuid::nil(),
            step: 1,
            agent: "a".into(),
            model: "gpt-4o-mini".into(),
            prompt_tokens: 1_000_000,
            completion_tokens: 0,
            total_tokens: 1_000_000,
            purpose: None,
            credits: None,
            price: None,
        };
        p.cost_charge(&mut u);
        assert_eq!(u.credits, Some(150_000));
        assert_eq!(u.price.unwrap().prompt, 150_000);
        // A later price (another file) does not re-price it.
        let other = Prices::parse(
            "other.yaml",
            "default: {prompt: 1, completion: 1}\nmodels:\n  gpt-4o-mini: {prompt: 9, completion: 9}\n",
        )
        .unwrap();
        other.cost_charge(&mut u);
        assert_eq!(u.credits, Some(150_000));
    }

    #[test]
    fn a_bad_prices_file_is_refused_with_its_name_and_what_is_wrong() {
        let cases = [
            ("default: {prompt: 1", "did not find expected"),
            ("models: {}\n", "missing field `default`"),
            ("default: {prompt: 1}\n", "missing field `completion`"),
            (
                "default: {prompt: -1, completion: 1}\n",
                "default.prompt: invalid type",
            ),
            ("default: {prompt: 1.5, completion: 1}\n", "invalid type"),
            (
                "default: {prompt: 1, completion: 1, cached: 2}\n",
                "unknown field `cached`",
            ),
            (
                "default: {prompt: 1, completion: 1}\ncurrency: eur\n",
                "unknown field `currency`",
            ),
            (
                "default: {prompt: 1, completion: 1}\nmodels:\n  big: {prompt: 1000000000001, completion: 1}\n",
                "models.big.prompt",
            ),
            (
                "default: {prompt: 1, completion: 1}\nmodels:\n  \" \": {prompt: 1, completion: 1}\n",
                "model name",
            ),
        ];
        for (text, want) in cases {
            let msg = Prices::parse("my-prices.yaml", text)
                .unwrap_err()
                .to_string();
            assert!(msg.contains("my-prices.yaml"), "{msg}");
            assert!(msg.contains(want), "{text}: {msg}");
        }
        let missing = Prices::from_file(Path::new("/nonexistent/prices.yaml")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/prices.yaml"));
    }
}
