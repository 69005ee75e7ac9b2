//! The templates CreateTask creates from, kept in memory with their compiled input
//! schemas, so that a create costs no round trip to read its template.
//!
//! A registered version never changes and is never deleted, so a version once read stays
//! right. "The latest version of a name" can change, through any replica: the create
//! statement checks it (`NewTask::as_latest`) and writes nothing when a newer version
//! exists; the caller then forgets the name's latest ([`Catalog::forget_latest`]) and
//! tries again with what the database holds now.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tasker_domain::template::ContextSchema;
use tasker_store::{Store, TemplateRecord};

use crate::error::ApiResult;

/// Entries kept at most; past it the catalog starts afresh (templates are registered by
/// operators, so a deployment holds far fewer; what is asked for but not registered is
/// never kept).
const MAX_ENTRIES: usize = 4_096;

/// A template as creation needs it.
pub(crate) struct Known {
    pub(crate) record: TemplateRecord,
    /// Its compiled input schema, when it has one.
    pub(crate) schema: Option<ContextSchema>,
}

/// (namespace, name, version asked for: `None` for the latest).
type Key = (String, String, Option<String>);

#[derive(Clone)]
pub(crate) struct Catalog {
    store: Store,
    entries: Arc<Mutex<HashMap<Key, Arc<Known>>>>,
}

impl Catalog {
    pub(crate) fn new(store: Store) -> Catalog {
        Catalog { store, entries: Arc::default() }
    }

    /// The template `version` names, or the latest of the name when `None`: from memory
    /// when it has been read before, else from the database (`NotFound` is not kept).
    pub(crate) async fn get(&self, namespace: &str, name: &str, version: Option<&str>) -> ApiResult<Arc<Known>> {
        let key = (namespace.to_owned(), name.to_owned(), version.map(str::to_owned));
        if let Some(known) = self.entries.lock().expect("catalog lock").get(&key) {
            return Ok(known.clone());
        }
        let record = self.store.template(namespace, name, version).await?;
        let known = Arc::new(Known { schema: record.template.context_schema(), record });
        let mut entries = self.entries.lock().expect("catalog lock");
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key, known.clone());
        Ok(known)
    }

    /// Forgets which version is the latest of a name (a newer one was registered).
    pub(crate) fn forget_latest(&self, namespace: &str, name: &str) {
        self.entries.lock().expect("catalog lock").remove(&(namespace.to_owned(), name.to_owned(), None));
    }
}
