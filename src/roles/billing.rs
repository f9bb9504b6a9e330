//! The billing role: the usage ledger and the credit wallets from `usage.charged` and grants.

use super::{Shared, Shutdown, Task};

pub fn start(shared: &Shared, shutdown: Shutdown) -> anyhow::Result<Task> {
    let billing = mozaiks_billing::Billing::new(shared.bus.clone(), shared.store()?)
        .with_credits(shared.registry()?, shared.prices()?);
    Ok(Box::pin(async move {
        billing.run(shutdown.wait()).await?;
        Ok(())
    }))
}
