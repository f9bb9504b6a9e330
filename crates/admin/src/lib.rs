//! The control plane's workflows over the event log, the app registry and the read models.
//!
//! `mozaiks-control` holds the app aggregate, the registry every replica watches, tiers and
//! leases, and knows nothing of MongoDB. What needs both the registry and the read models lives
//! here, apart from the gateway (restate keeps admin apart from ingress): the gateway's handlers
//! parse, authorize and call an [`Admin`]; the binary wires the store's resolver with
//! [`storage::resolver`] for every role that reads or writes read models (gateway, projector,
//! billing), so none of them needs the gateway crate for it.
//!
//! - [`storage`]: where an app's read models live (the resolver behind
//!   [`mozaiks_store::Store::resolve_storage`]) and the tier → dedicated-database rule;
//! - [`moves`]: moving an app's read models to another database (copy, catch up, switch, settle,
//!   under a fleet-wide lease);
//! - [`apps`]: creating an app (a dedicated-database tier gets its database from the start) and
//!   deleting one (its unfinished chats get `cancel`).

pub mod apps;
pub mod metrics;
pub mod moves;
pub mod storage;

use std::sync::Arc;

use mozaiks_bus::Bus;
use mozaiks_bus::fleet::InstanceId;
use mozaiks_control::{App, Registry};
use mozaiks_store::Store;

pub use apps::NewApp;
pub use moves::{MoveReport, MoveState, StorageView};

/// Errors of the control-plane workflows.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The app registry refused or failed (its [`mozaiks_control::Error`] says which).
    #[error(transparent)]
    Control(#[from] mozaiks_control::Error),
    /// The event log failed.
    #[error(transparent)]
    Bus(#[from] mozaiks_bus::Error),
    /// The read models failed.
    #[error(transparent)]
    Store(#[from] mozaiks_store::Error),
    /// No such app, or a deleted one.
    #[error("no such app")]
    AppNotFound,
    /// A storage move's target is not acceptable; the text says why.
    #[error("{0}")]
    InvalidStorage(String),
    /// Another move of the app holds its lease, on this replica or another.
    #[error("this app is being moved; retry when the move has finished")]
    MoveInProgress,
    /// The move could not renew its lease in time and stopped; repeating it completes it.
    #[error("the move lost its lease; repeat it to complete it")]
    MoveInterrupted,
}

/// The control-plane workflows of one process. Cheap to clone.
#[derive(Clone)]
pub struct Admin {
    bus: Bus,
    store: Store,
    registry: Registry,
    /// Holder of the storage-move leases this process takes.
    instance: InstanceId,
}

impl Admin {
    pub fn new(bus: Bus, store: Store, registry: Registry, instance: InstanceId) -> Admin {
        metrics::describe();
        Admin {
            bus,
            store,
            registry,
            instance,
        }
    }

    /// The app, unless it does not exist or is deleted; a miss reads the registry's bucket, so an
    /// app created a moment ago on another replica is found.
    pub async fn live_app(&self, app_id: &str) -> Result<Arc<App>, Error> {
        self.registry
            .read_through(app_id)
            .await?
            .filter(|a| !a.is_deleted())
            .ok_or(Error::AppNotFound)
    }
}
