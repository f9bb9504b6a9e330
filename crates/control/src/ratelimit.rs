//! Requests per minute per app: a token bucket per app, per replica.
//!
//! Each gateway replica keeps its own buckets, with no network round trip on the hot path. To
//! make the limit fleet-wide, the gateway gives each bucket the replica's share of the app's
//! budget, `requests_per_minute / N` rounded up with N the live gateway replicas it sees in
//! `MZ_PRESENCE` ([`crate::Registry::check_rate_among`]): with a load balancer that spreads
//! requests evenly the fleet admits about the app's limit (at most N − 1 over, from rounding). A
//! balancer that sends an app's traffic unevenly gives it less than its limit, never more.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Per-app token buckets: capacity `rpm` (a minute's worth of burst), refilled at `rpm / 60`
/// per second.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes one token from `app_id`'s bucket, or says how long until one is available.
    pub fn check(&self, app_id: &str, rpm: u32, now: Instant) -> Result<(), Duration> {
        let capacity = f64::from(rpm.max(1));
        let per_sec = capacity / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(app_id.to_string()).or_insert(Bucket {
            tokens: capacity,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        // A lowered limit takes effect at once: never hold more than the current capacity.
        b.tokens = (b.tokens + elapsed * per_sec).min(capacity);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / per_sec))
        }
    }

    /// Forgets an app (e.g. when it is deleted).
    pub fn forget(&self, app_id: &str) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets.remove(app_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_rpm_then_refusal_then_refill() {
        let rl = RateLimiter::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(rl.check("a", 3, t0).is_ok());
        }
        let wait = rl.check("a", 3, t0).unwrap_err();
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        // Another app has its own bucket.
        assert!(rl.check("b", 3, t0).is_ok());
        // 20 s later one token is back (3 per minute).
        assert!(rl.check("a", 3, t0 + Duration::from_secs(20)).is_ok());
        assert!(rl.check("a", 3, t0 + Duration::from_secs(20)).is_err());
    }

    #[test]
    fn a_lowered_limit_applies_at_once() {
        let rl = RateLimiter::default();
        let t0 = Instant::now();
        assert!(rl.check("a", 1000, t0).is_ok());
        assert!(
            rl.check("a", 1, t0).is_ok(),
            "capacity clamps to 1, one token left"
        );
        assert!(rl.check("a", 1, t0).is_err());
        rl.forget("a");
        assert!(rl.check("a", 1, t0).is_ok());
    }
}
