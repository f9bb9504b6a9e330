//! The wallet of an app, computed from what billing knows: the app's limits (included credits,
//! overage), the credits consumed per period (the usage ledger), the grants and, with a per-user
//! budget, today's consumption per user. Pure: [`compute`] does no I/O and is tested given
//! inputs / then wallet.
//!
//! How credits are spent, period by period (oldest first): a period's consumption uses the
//! period's included credits first, then grants usable in that period — granted before the
//! period ends and not expired before it starts — those with an expiry first (the earliest
//! first), then the others (the oldest first). What a period leaves of its included credits
//! lapses (not rolled over); what it leaves of a grant carries on until the grant expires. The
//! current period's `granted` is what the usable grants have left before this period's
//! consumption, and `balance = included + granted - consumed`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use mozaiks_control::credits::{Wallet, WalletState};
use mozaiks_control::{EffectiveLimits, Overage};
use mozaiks_events::credits::CreditGrant;
use mozaiks_store::credits::{Period, day_key};

/// The alerts, by threshold.
pub const LOW: &str = "credits.low";
pub const EXHAUSTED: &str = "credits.exhausted";

/// What a wallet is computed from.
pub struct Inputs<'a> {
    pub app_id: &'a str,
    pub limits: EffectiveLimits,
    /// Credits consumed per period key.
    pub consumption: &'a BTreeMap<String, u64>,
    pub grants: &'a [CreditGrant],
    /// Credits consumed today per user (when the app has a per-user budget).
    pub users_today: Option<&'a BTreeMap<String, u64>>,
    /// Alerts already sent in the current period.
    pub alerts: Vec<String>,
    pub now: DateTime<Utc>,
}

/// The wallet of `i.app_id` at `i.now`, and the alerts that are due and not yet sent.
pub fn compute(i: Inputs<'_>) -> (Wallet, Vec<&'static str>) {
    let current = Period::containing(i.now);
    let key = current.key();
    let included = i.limits.included_credits;
    // Grants in the order they are spent.
    let mut order: Vec<usize> = (0..i.grants.len()).collect();
    order.sort_by_key(|&n| {
        let g = &i.grants[n];
        (
            g.expires_at.is_none(),
            g.expires_at,
            g.granted_at,
            g.grant_id.clone(),
        )
    });
    let mut left: Vec<u64> = i.grants.iter().map(|g| g.amount).collect();
    let spend = |left: &mut Vec<u64>, mut rest: u64, usable: &dyn Fn(&CreditGrant) -> bool| {
        for &n in &order {
            if rest == 0 {
                break;
            }
            if usable(&i.grants[n]) {
                let take = rest.min(left[n]);
                left[n] -= take;
                rest -= take;
            }
        }
    };
    for (k, &consumed) in i.consumption.range(..key.clone()) {
        let Some(p) = Period::of_key(k) else {
            continue;
        };
        spend(&mut left, consumed.saturating_sub(included), &|g| {
            g.granted_at < p.end && g.expires_at.is_none_or(|e| e > p.start)
        });
    }
    let usable_now =
        |g: &CreditGrant| g.granted_at < current.end && g.expires_at.is_none_or(|e| e > i.now);
    let granted: u64 = i
        .grants
        .iter()
        .zip(&left)
        .filter(|(g, _)| usable_now(g))
        .map(|(_, l)| *l)
        .fold(0u64, u64::saturating_add);
    let consumed = i.consumption.get(&key).copied().unwrap_or(0);
    // What the current period's consumption leaves of each grant, for the next expiry.
    let mut after = left.clone();
    spend(&mut after, consumed.saturating_sub(included), &usable_now);
    let next_expiry = i
        .grants
        .iter()
        .zip(&after)
        .filter(|(g, l)| usable_now(g) && **l > 0)
        .filter_map(|(g, _)| g.expires_at)
        .min();
    let total = i128::from(included) + i128::from(granted);
    let balance_wide = total - i128::from(consumed);
    let balance =
        i64::try_from(balance_wide).unwrap_or(if balance_wide < 0 { i64::MIN } else { i64::MAX });
    let overage = u64::try_from(-balance_wide.min(0)).unwrap_or(u64::MAX);
    let allowed_past = match i.limits.overage {
        Overage::Block => 0,
        Overage::Allow => i.limits.overage_limit,
    };
    let blocked = balance_wide <= -i128::from(allowed_past);
    let used_80 = i128::from(consumed) * 5 >= total * 4 && (total > 0 || consumed > 0);
    let state = if blocked {
        WalletState::Exhausted
    } else if used_80 || overage > 0 || total == 0 {
        WalletState::Low
    } else {
        WalletState::Ok
    };
    let mut due = Vec::new();
    if used_80 && !i.alerts.iter().any(|a| a == LOW) {
        due.push(LOW);
    }
    if (consumed > 0 || total > 0)
        && i128::from(consumed) >= total
        && !i.alerts.iter().any(|a| a == EXHAUSTED)
    {
        due.push(EXHAUSTED);
    }
    let today = day_key(i.now);
    let users_over_budget = match (i.limits.user_daily_credits, i.users_today) {
        (Some(budget), Some(users)) => users
            .iter()
            .filter(|(_, c)| **c >= budget)
            .map(|(u, _)| u.clone())
            .collect(),
        _ => Vec::new(),
    };
    let wallet = Wallet {
        app_id: i.app_id.to_string(),
        period: key,
        period_start: current.start,
        period_end: current.end,
        included,
        granted,
        consumed,
        balance,
        overage,
        overage_policy: i.limits.overage,
        overage_limit: i.limits.overage_limit,
        state,
        blocked,
        day: i.limits.user_daily_credits.map(|_| today),
        users_over_budget,
        alerts: i.alerts,
        next_expiry,
        updated_at: i.now,
    };
    (wallet, due)
}

/// Whether two wallets say the same (all but `updated_at`).
pub fn same(a: &Wallet, b: &Wallet) -> bool {
    let mut b = b.clone();
    b.updated_at = a.updated_at;
    *a == b
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn limits(included: u64, overage: Overage, overage_limit: u64) -> EffectiveLimits {
        EffectiveLimits {
            max_concurrent_runs: 1,
            max_parallel_children: 1,
            max_websockets: 1,
            requests_per_minute: 1,
            retention_days: 1,
            included_credits: included,
            overage,
            overage_limit,
            user_daily_credits: None,
        }
    }

    fn grant(
        id: &str,
        amount: u64,
        at: DateTime<Utc>,
        expires: Option<DateTime<Utc>>,
    ) -> CreditGrant {
        CreditGrant {
            grant_id: id.into(),
            app_id: "a".into(),
            amount,
            reason: "r".into(),
            expires_at: expires,
            idempotency_key: id.into(),
            granted_at: at,
            granted_by: "root".into(),
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 15, 12, 0, 0).unwrap()
    }

    fn run(
        l: EffectiveLimits,
        consumption: &[(&str, u64)],
        grants: &[CreditGrant],
    ) -> (Wallet, Vec<&'static str>) {
        let c: BTreeMap<String, u64> = consumption
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        compute(Inputs {
            app_id: "a",
            limits: l,
            consumption: &c,
            grants,
            users_today: None,
            alerts: vec![],
            now: now(),
        })
    }

    const DEC: &str = "20261201T000000Z";
    const NOV: &str = "20261101T000000Z";

    #[test]
    fn included_credits_are_per_period_and_not_rolled_over() {
        let l = limits(100, Overage::Block, 0);
        // November used 10 of its 100: December still has 100, not 190.
        let (w, due) = run(l, &[(NOV, 10), (DEC, 30)], &[]);
        assert_eq!(
            (w.included, w.granted, w.consumed, w.balance),
            (100, 0, 30, 70)
        );
        assert_eq!((w.state, w.blocked), (WalletState::Ok, false));
        assert!(due.is_empty());
        assert_eq!(w.period, DEC);
        let (w, due) = run(l, &[(DEC, 85)], &[]);
        assert_eq!((w.state, due), (WalletState::Low, vec![LOW]));
        let (w, due) = run(l, &[(DEC, 100)], &[]);
        assert_eq!(
            (w.state, w.blocked, w.balance),
            (WalletState::Exhausted, true, 0)
        );
        assert_eq!(due, vec![LOW, EXHAUSTED]);
    }

    #[test]
    fn grants_carry_over_and_expiring_grants_are_spent_first() {
        let l = limits(100, Overage::Block, 0);
        let oct = Utc.with_ymd_and_hms(2026, 10, 20, 0, 0, 0).unwrap();
        let keeps = grant("keeps", 50, oct, None);
        let expiring = grant("expiring", 40, oct, Some(now() + Duration::days(30)));
        // November used 130: 100 included, then 30 of the expiring grant (spent first).
        let (w, _) = run(
            l,
            &[(NOV, 130), (DEC, 0)],
            &[keeps.clone(), expiring.clone()],
        );
        assert_eq!(w.granted, 50 + 10);
        assert_eq!(w.balance, 160);
        assert_eq!(w.next_expiry, expiring.expires_at);
        // A grant that expired before this period started is gone; one expired now is too.
        let lapsed = grant("lapsed", 40, oct, Some(now() - Duration::hours(1)));
        let (w, _) = run(l, &[(NOV, 130)], &[keeps, lapsed]);
        assert_eq!(
            w.granted, 50,
            "the lapsed grant paid November's 30, then expired"
        );
        assert_eq!(w.next_expiry, None);
    }

    #[test]
    fn a_grant_restores_an_exhausted_app() {
        let l = limits(10, Overage::Block, 0);
        let (w, _) = run(l, &[(DEC, 12)], &[]);
        assert!(w.blocked);
        assert_eq!(w.overage, 2, "the last call overshot the balance");
        let (w, _) = run(l, &[(DEC, 12)], &[grant("g", 100, now(), None)]);
        assert!(!w.blocked);
        assert_eq!((w.granted, w.balance), (100, 98));
    }

    #[test]
    fn overage_allow_goes_on_up_to_the_limit() {
        let l = limits(10, Overage::Allow, 5);
        let (w, _) = run(l, &[(DEC, 13)], &[]);
        assert_eq!(
            (w.blocked, w.overage, w.state),
            (false, 3, WalletState::Low)
        );
        let (w, _) = run(l, &[(DEC, 15)], &[]);
        assert_eq!(
            (w.blocked, w.overage, w.state),
            (true, 5, WalletState::Exhausted)
        );
    }

    #[test]
    fn alerts_already_sent_are_not_due_again_and_users_over_budget_are_listed() {
        let mut l = limits(100, Overage::Block, 0);
        l.user_daily_credits = Some(20);
        let c: BTreeMap<String, u64> = [(DEC.to_string(), 90)].into();
        let users: BTreeMap<String, u64> = [("ann".to_string(), 25), ("bob".to_string(), 5)].into();
        let (w, due) = compute(Inputs {
            app_id: "a",
            limits: l,
            consumption: &c,
            grants: &[],
            users_today: Some(&users),
            alerts: vec![LOW.to_string()],
            now: now(),
        });
        assert!(due.is_empty());
        assert_eq!(w.users_over_budget, vec!["ann".to_string()]);
        assert_eq!(w.day.as_deref(), Some("20261215"));
    }
}
