//! Where an app's read models live.
//!
//! `resolve_storage(app_id)` is [`mozaiks_store::Store::resolve_storage`] with the resolver from
//! [`resolver`]: the app's view in the registry (`App.storage`, set by `app.storage_changed`)
//! names its own database, else the shared one. Projector, billing and every read endpoint go
//! through it, on every replica, within the registry's propagation time.
//!
//! **The tier → dedicated-database rule** ([`Tier::has_own_database`](mozaiks_control::Tier)):
//! an app of a tier whose `database` is `dedicated` gets its own database when it is created
//! ([`for_new_app`], named by [`default_db_name`]), and only such an app may be moved to a
//! database other than the shared one ([`crate::Admin::move_storage`]; the app aggregate refuses
//! `app.storage_changed` for any other).

use std::sync::Arc;

use mozaiks_control::tiers::Tiers;
use mozaiks_control::{AppStorage, Registry};
use mozaiks_store::{Placement, Resolver, Route};

use crate::Error;

/// The store's resolver: each app's placement and deletion from the replica's app registry.
pub fn resolver(registry: &Registry) -> Resolver {
    let registry = registry.clone();
    Arc::new(move |app_id: &str| match registry.get(app_id) {
        None => Route::default(),
        Some(app) => Route {
            placement: app.storage.as_ref().map(placement),
            deleted: app.is_deleted(),
        },
    })
}

/// The store's placement of an app's own database.
pub fn placement(s: &AppStorage) -> Placement {
    Placement {
        db_name: s.db_name.clone(),
        mongo_uri: s.mongo_uri.clone(),
    }
}

/// The database a new app of `tier` starts with: its own (on the shared deployment) when the
/// tier has dedicated databases, else none (the shared one). An unknown tier gets none; the app
/// aggregate refuses it anyway.
pub fn for_new_app(tiers: &Tiers, shared: &str, tier: &str, app_id: &str) -> Option<AppStorage> {
    tiers
        .get(tier)
        .filter(|t| t.has_own_database())
        .map(|_| AppStorage {
            db_name: default_db_name(shared, app_id),
            mongo_uri: None,
        })
}

/// The database name given to a new app of a dedicated-database tier: `{shared}_{app_id}`, or a
/// shorter unique name when that is too long for MongoDB.
pub fn default_db_name(shared: &str, app_id: &str) -> String {
    let name = format!("{shared}_{app_id}");
    if name.len() <= AppStorage::MAX_DB_NAME {
        return name;
    }
    let short: String = app_id.chars().take(40).collect();
    let tag = uuid::Uuid::now_v7().simple().to_string();
    format!("mzapp_{short}_{}", &tag[tag.len() - 8..])
}

/// A move's target from its request: `None` is the shared database (`db_name` absent, or the
/// shared database's name without a `mongo_uri`), else a valid database of the app's own.
pub fn target(
    shared: &str,
    db_name: Option<String>,
    mongo_uri: Option<String>,
) -> Result<Option<AppStorage>, Error> {
    match (db_name, mongo_uri) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(Error::InvalidStorage("mongo_uri needs a db_name".into())),
        (Some(db), None) if db == shared => Ok(None),
        (Some(db_name), mongo_uri) => {
            let s = AppStorage { db_name, mongo_uri };
            s.validate().map_err(Error::InvalidStorage)?;
            Ok(Some(s))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_app_of_a_dedicated_tier_gets_its_own_database() {
        let tiers = Tiers::embedded().unwrap();
        let (dedicated, shared): (Vec<&str>, Vec<&str>) = tiers
            .names()
            .partition(|n| tiers.get(n).unwrap().has_own_database());
        assert!(!dedicated.is_empty() && !shared.is_empty());
        for t in dedicated {
            let s = for_new_app(&tiers, "mozaiks", t, "acme").unwrap();
            assert_eq!((s.db_name.as_str(), s.mongo_uri), ("mozaiks_acme", None));
        }
        for t in shared {
            assert_eq!(for_new_app(&tiers, "mozaiks", t, "acme"), None);
        }
        assert_eq!(for_new_app(&tiers, "mozaiks", "no-such-tier", "acme"), None);
    }

    #[test]
    fn a_name_too_long_for_mongo_is_shortened_and_unique() {
        let id = "a".repeat(60);
        let a = default_db_name("mozaiks", &id);
        let b = default_db_name("mozaiks", &id);
        assert!(a.len() <= AppStorage::MAX_DB_NAME, "{a}");
        assert!(a.starts_with(&format!("mzapp_{}_", "a".repeat(40))), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn a_target_is_the_shared_database_or_a_valid_one() {
        let t = |db: Option<&str>, uri: Option<&str>| {
            target("mozaiks", db.map(Into::into), uri.map(Into::into))
        };
        assert!(matches!(t(None, None), Ok(None)));
        assert!(matches!(t(Some("mozaiks"), None), Ok(None)));
        let own = t(Some("mozaiks"), Some("mongodb://other:27017"))
            .unwrap()
            .unwrap();
        assert_eq!(own.mongo_uri.as_deref(), Some("mongodb://other:27017"));
        assert_eq!(
            t(Some("acme_db"), None).unwrap().unwrap().db_name,
            "acme_db"
        );
        match t(None, Some("mongodb://other:27017")) {
            Err(Error::InvalidStorage(why)) => assert_eq!(why, "mongo_uri needs a db_name"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(t(Some(""), None), Err(Error::InvalidStorage(_))));
        assert!(matches!(
            t(Some("a/b"), None),
            Err(Error::InvalidStorage(_))
        ));
    }
}
