//! Metric names of billing.

pub const CHARGES: &str = "mozaiks_billing_charges_total";
pub const DUPLICATES: &str = "mozaiks_billing_duplicates_total";
pub const TOKENS: &str = "mozaiks_billing_tokens_total";
pub const APPLY_SECONDS: &str = "mozaiks_billing_apply_seconds";
pub const RETRIES: &str = "mozaiks_billing_retries_total";
pub const DEFERRED: &str = "mozaiks_billing_deferred_total";
pub const WAITING: &str = "mozaiks_billing_waiting_for_store";
pub const WALLETS_WRITTEN: &str = "mozaiks_billing_wallets_written_total";
pub const WALLET_CONFLICTS: &str = "mozaiks_billing_wallet_conflicts_total";
pub const WALLET_FAILURES: &str = "mozaiks_billing_wallet_failures_total";
pub const WALLET_SECONDS: &str = "mozaiks_billing_wallet_seconds";
pub const WALLET_UPDATES: &str = "mozaiks_billing_wallet_updates_total";
pub const GRANTS: &str = "mozaiks_billing_grants_total";
pub const ALERTS: &str = "mozaiks_billing_alerts_total";

pub fn describe() {
    metrics::describe_counter!(
        CHARGES,
        "usage.charged events applied to the ledger, by app_id."
    );
    metrics::describe_counter!(DUPLICATES, "Redelivered charges ignored.");
    metrics::describe_counter!(TOKENS, "Tokens billed, by app_id.");
    metrics::describe_histogram!(
        APPLY_SECONDS,
        metrics::Unit::Seconds,
        "Time to write one batch of charges to the ledger."
    );
    metrics::describe_counter!(
        RETRIES,
        "Attempts to write a batch of charges that failed (the batch is kept and retried)."
    );
    metrics::describe_counter!(
        DEFERRED,
        "Charges handed back to JetStream with a delay because their database kept failing \
         while the shared one answered."
    );
    metrics::describe_counter!(
        WALLETS_WRITTEN,
        "Wallets written to MZ_CREDITS, by state (ok, low, exhausted)."
    );
    metrics::describe_counter!(
        WALLET_CONFLICTS,
        "Wallet writes overtaken by another billing replica (read and computed again)."
    );
    metrics::describe_counter!(
        WALLET_FAILURES,
        "Wallet computations or writes that failed (retried)."
    );
    metrics::describe_histogram!(
        WALLET_SECONDS,
        metrics::Unit::Seconds,
        "Time to compute and write one wallet."
    );
    metrics::describe_counter!(
        WALLET_UPDATES,
        "Wallet updates after a batch of charges, by how: added (the batch's charges added to \
         the inputs of the revision read before writing them, no Mongo read) or recomputed \
         (from Mongo: a duplicate in the batch, another writer in between, no inputs known)."
    );
    metrics::describe_counter!(GRANTS, "Credit grants recorded, by app_id.");
    metrics::describe_counter!(
        ALERTS,
        "Credit alerts appended (credits.low, credits.exhausted), by app_id and kind."
    );
    metrics::describe_gauge!(
        WAITING,
        "1 while billing holds charges it cannot write (Mongo stalled or down), else 0."
    );
}
