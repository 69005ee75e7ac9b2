//! The template registry: namespaces and immutable named tasks.

use crate::counter::Counted;
use chrono::{DateTime, Utc};
use tasker_domain::Template;
use tokio_postgres::{Row, types::Json};
use uuid::Uuid;

use crate::{Error, Result, Store};

/// A registered template.
#[derive(Debug, Clone)]
pub struct TemplateRecord {
    pub id: Uuid,
    pub template: Template,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct RegisterOutcome {
    pub record: TemplateRecord,
    /// False when identical content was already registered.
    pub created: bool,
}

fn record(row: &Row) -> TemplateRecord {
    let Json(template): Json<Template> = row.get(1);
    TemplateRecord { id: row.get(0), template, created_at: row.get(2) }
}

const COLUMNS: &str = "n.id, n.template, n.created_at";

/// Versions of one name, the one "latest" means first: the highest release, or the
/// highest pre-release when there is no release (as cargo picks versions).
pub(crate) const LATEST_FIRST: &str =
    "ORDER BY (n.pre = '') DESC, n.major DESC, n.minor DESC, n.patch DESC, n.pre DESC";

impl Store {
    /// Registers a validated template. The same namespace/name/version with the same
    /// content is a no-op; with different content it is refused.
    pub async fn register_template(&self, template: &Template) -> Result<RegisterOutcome> {
        let mut tx = self.begin().await?;
        let ns: Uuid = tx
            .query(
                "INSERT INTO task_namespaces (id, name) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
                &[&tasker_domain::new_id(), &template.namespace],
            )
            .await?[0]
            .get(0);
        let hash = template.content_hash();
        let v = &template.version;
        let inserted = tx
            .query(
                "INSERT INTO named_tasks (id, namespace_id, name, version, major, minor, patch, pre, description, \
                   template, content_hash) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                 ON CONFLICT (namespace_id, name, version) DO NOTHING RETURNING id, template, created_at",
                &[
                    &tasker_domain::new_id(),
                    &ns,
                    &template.name,
                    &v.to_string(),
                    &(v.major as i64),
                    &(v.minor as i64),
                    &(v.patch as i64),
                    &v.pre.as_str(),
                    &template.description,
                    &Json(template),
                    &hash,
                ],
            )
            .await?;
        if let Some(row) = inserted.first() {
            let record = record(row);
            tx.commit().await?;
            return Ok(RegisterOutcome { record, created: true });
        }
        let existing = tx
            .query(
                &format!(
                    "SELECT {COLUMNS}, n.content_hash FROM named_tasks n \
                     WHERE n.namespace_id = $1 AND n.name = $2 AND n.version = $3"
                ),
                &[&ns, &template.name, &v.to_string()],
            )
            .await?;
        tx.rollback().await?;
        let row = existing.first().ok_or_else(|| Error::Corrupt("registered template vanished".into()))?;
        if row.get::<_, &str>(3) != hash {
            return Err(Error::AlreadyExists(format!(
                "template {}/{} {} is already registered with different content; register a new version",
                template.namespace, template.name, v
            )));
        }
        Ok(RegisterOutcome { record: record(row), created: false })
    }

    /// One template: the given version, or the latest when `None`: the highest release,
    /// or the highest pre-release when there is no release (as cargo picks versions).
    pub async fn template(&self, namespace: &str, name: &str, version: Option<&str>) -> Result<TemplateRecord> {
        let client = self.client().await?;
        let stmt = client
            .statement(&format!(
                "SELECT {COLUMNS} FROM named_tasks n JOIN task_namespaces ns ON ns.id = n.namespace_id \
                 WHERE ns.name = $1 AND n.name = $2 AND ($3::text IS NULL OR n.version = $3) {LATEST_FIRST} LIMIT 1"
            ))
            .await?;
        let rows = client.query(&stmt, &[&namespace, &name, &version]).await?;
        rows.first().map(record).ok_or_else(|| {
            Error::NotFound(match version {
                Some(v) => format!("template {namespace}/{name} {v} not found"),
                None => format!("template {namespace}/{name} not found"),
            })
        })
    }

    /// Every template, or those of one namespace; by namespace, name, newest version first.
    pub async fn list_templates(&self, namespace: Option<&str>) -> Result<Vec<TemplateRecord>> {
        let client = self.client().await?;
        let stmt = client
            .statement(&format!(
                "SELECT {COLUMNS} FROM named_tasks n JOIN task_namespaces ns ON ns.id = n.namespace_id \
                 WHERE ($1::text IS NULL OR ns.name = $1) \
                 ORDER BY ns.name, n.name, n.major DESC, n.minor DESC, n.patch DESC, n.pre DESC"
            ))
            .await?;
        Ok(client.query(&stmt, &[&namespace]).await?.iter().map(record).collect())
    }

    /// Every namespace with its number of registered templates.
    pub async fn list_namespaces(&self) -> Result<Vec<(String, i64)>> {
        let client = self.client().await?;
        let stmt = client
            .statement(
                "SELECT ns.name, count(n.id) FROM task_namespaces ns \
                 LEFT JOIN named_tasks n ON n.namespace_id = ns.id GROUP BY ns.name ORDER BY ns.name",
            )
            .await?;
        Ok(client.query(&stmt, &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
