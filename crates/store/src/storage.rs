//! `resolve_storage(app_id)`: which database holds an app's read models.
//!
//! The store does not know apps; a [`Resolver`] callback (wired by the binary to the control
//! plane's app registry, a replica-local map kept current by a KV watch) says where each app
//! lives. An app without a [`Placement`] uses the shared database. Databases are opened lazily and
//! cached; their indexes are ensured the first time this process uses them, so a new app database
//! is ready for queries and idempotent writes without a separate set-up step. A placement with its
//! own `mongo_uri` gets its own client (one per URI, shared by every app on that deployment).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use mongodb::options::ClientOptions;
use mongodb::{Client, Database};

use crate::{Error, Store};

/// An app's own database: `db_name` on the shared deployment, or on the one at `mongo_uri`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Placement {
    pub db_name: String,
    pub mongo_uri: Option<String>,
}

/// What the resolver knows of an app.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Route {
    /// `None`: the shared database.
    pub placement: Option<Placement>,
    /// The app was deleted: the projector skips its events.
    pub deleted: bool,
}

/// Says where an app's read models live. Called on every read and projected batch: keep it cheap
/// (a map lookup).
pub type Resolver = Arc<dyn Fn(&str) -> Route + Send + Sync>;

/// Open databases and clients, shared by the clones of a [`Store`].
#[derive(Default)]
pub(crate) struct Cache {
    dbs: RwLock<HashMap<Placement, Database>>,
    clients: Mutex<HashMap<String, Client>>,
}

impl Store {
    /// This store with `resolver` deciding each app's database (by default every app uses the
    /// shared one).
    pub fn with_resolver(mut self, resolver: Resolver) -> Store {
        self.resolver = Some(resolver);
        self
    }

    /// What the resolver says of `app_id`.
    pub fn route(&self, app_id: &str) -> Route {
        self.resolver
            .as_ref()
            .map(|r| r(app_id))
            .unwrap_or_default()
    }

    /// The database that holds `app_id`'s read models, with its indexes ensured.
    pub async fn resolve_storage(&self, app_id: &str) -> Result<Database, Error> {
        let route = self.route(app_id);
        self.database(route.placement.as_ref()).await
    }

    /// The database at `placement` (`None`: the shared one), opened and indexed on first use.
    pub async fn database(&self, placement: Option<&Placement>) -> Result<Database, Error> {
        let shared;
        let key = match placement {
            Some(p) => p,
            None => {
                shared = Placement {
                    db_name: self.db.name().to_string(),
                    mongo_uri: None,
                };
                &shared
            }
        };
        if let Some(db) = self
            .cache
            .dbs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            return Ok(db.clone());
        }
        let client = match &key.mongo_uri {
            None => self.client.clone(),
            Some(uri) => self.client_for(uri).await?,
        };
        let db = client.database(&key.db_name);
        self.ensure_indexes(&db).await?;
        tracing::info!(db = %key.db_name, own_deployment = key.mongo_uri.is_some(), "Read-model database opened; indexes ensured.");
        self.cache
            .dbs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), db.clone());
        Ok(db)
    }

    async fn client_for(&self, uri: &str) -> Result<Client, Error> {
        if let Some(c) = self
            .cache
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(uri)
        {
            return Ok(c.clone());
        }
        let mut opts = ClientOptions::parse(uri)
            .await
            .map_err(|e| Error::Connect(e.to_string()))?;
        opts.app_name = Some("mozaiks".into());
        opts.server_selection_timeout = Some(Duration::from_secs(5));
        opts.connect_timeout = Some(Duration::from_secs(5));
        let client = Client::with_options(opts).map_err(|e| Error::Connect(e.to_string()))?;
        let mut clients = self
            .cache
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(clients.entry(uri.to_string()).or_insert(client).clone())
    }
}
