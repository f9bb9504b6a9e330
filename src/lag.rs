//! How far behind the log each durable consumer of this process's roles is, as gauges the
//! dashboards and alerts read (projector lag, billing lag, the workers' pending commands):
//!
//! - `mozaiks_consumer_pending_messages{consumer}`: messages of the stream the consumer has not
//!   been delivered yet (JetStream's `num_pending`);
//! - `mozaiks_consumer_ack_pending_messages{consumer}`: delivered and not yet acknowledged.
//!
//! Every process samples the consumers of its own roles every few seconds (the same figures
//! from every replica: dashboards take `max by (consumer)`). `consumer` is one of four names.

use std::time::Duration;

use mozaiks_bus::Bus;

pub const PENDING: &str = "mozaiks_consumer_pending_messages";
pub const ACK_PENDING: &str = "mozaiks_consumer_ack_pending_messages";

/// How often the consumers are sampled.
const EVERY: Duration = Duration::from_secs(5);

pub fn describe() {
    metrics::describe_gauge!(
        PENDING,
        "Messages a durable consumer has not been delivered yet (JetStream num_pending), by consumer."
    );
    metrics::describe_gauge!(
        ACK_PENDING,
        "Messages delivered to a durable consumer and not yet acknowledged, by consumer."
    );
}

/// The `(stream, consumer)` pairs the roles of a process read.
pub fn consumers(
    worker: bool,
    projector: bool,
    billing: bool,
) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if worker {
        out.push(("MZ_CMD", "workers"));
    }
    if projector {
        out.push(("MZ_EVT", "projector"));
    }
    if billing {
        out.push(("MZ_USAGE", "billing"));
        out.push(("MZ_BILLING", "billing-grants"));
    }
    out
}

/// Samples `consumers` until `stopped` resolves.
pub fn spawn(
    bus: Bus,
    consumers: Vec<(&'static str, &'static str)>,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) {
    if consumers.is_empty() {
        return;
    }
    tokio::spawn(async move {
        tokio::pin!(stopped);
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = tick.tick() => {}
            }
            for (stream, consumer) in &consumers {
                sample(&bus, stream, consumer).await;
            }
        }
    });
}

async fn sample(bus: &Bus, stream: &str, consumer: &'static str) {
    let info = match bus.durable(stream, consumer).await {
        Ok(mut c) => c.info().await.cloned(),
        Err(e) => {
            tracing::debug!(consumer, error = %e, "Cannot read the consumer's lag.");
            return;
        }
    };
    match info {
        Ok(info) => {
            metrics::gauge!(PENDING, "consumer" => consumer).set(info.num_pending as f64);
            metrics::gauge!(ACK_PENDING, "consumer" => consumer).set(info.num_ack_pending as f64);
        }
        Err(e) => tracing::debug!(consumer, error = %e, "Cannot read the consumer's lag."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_samples_its_own_consumers() {
        assert_eq!(consumers(true, false, false), vec![("MZ_CMD", "workers")]);
        assert_eq!(
            consumers(false, true, true),
            vec![
                ("MZ_EVT", "projector"),
                ("MZ_USAGE", "billing"),
                ("MZ_BILLING", "billing-grants")
            ]
        );
        assert!(consumers(false, false, false).is_empty());
    }
}
