//! TemplateService, and loading templates from a directory at start-up.

use std::path::Path;

use tasker_domain::{Limits, Template};
use tasker_proto::v1::{self as pb, template_service_server::TemplateService};
use tasker_store::Store;
use tonic::{Request, Response, Status};

use tasker_auth::Principal;

use crate::{
    auth::{Allowed, caller},
    catalog::Catalog,
    convert,
    error::{ApiError, ApiResult},
    input,
};

#[derive(Clone)]
pub struct Templates {
    pub(crate) store: Store,
    pub(crate) limits: Limits,
    /// What CreateTask keeps of templates: told when this replica registers a version.
    pub(crate) catalog: Catalog,
}

impl Templates {
    /// Registers a template; `caller`, when given, must see its namespace (known only
    /// once the YAML is parsed; nothing is written before the check).
    pub(crate) async fn register(
        &self,
        yaml: &str,
        caller: Option<&Principal>,
    ) -> ApiResult<pb::RegisterTemplateResponse> {
        if yaml.trim().is_empty() {
            return Err(ApiError::invalid("yaml", "required"));
        }
        let template = Template::from_yaml(yaml, &self.limits)?;
        if let Some(caller) = caller {
            caller.require_namespace(&template.namespace)?;
        }
        let outcome = self.store.register_template(&template).await?;
        if outcome.created {
            self.catalog.forget_latest(&template.namespace, &template.name);
            tracing::info!(namespace = template.namespace, name = template.name, version = %template.version, "template registered");
        }
        Ok(pb::RegisterTemplateResponse {
            template: Some(convert::template(&outcome.record)),
            created: outcome.created,
        })
    }

    /// Registers every `*.yaml` / `*.yml` in `dir` (sorted by file name). A file that does
    /// not validate stops the start-up, naming the file.
    pub async fn load_dir(&self, dir: &Path) -> anyhow::Result<usize> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| anyhow::anyhow!("api.templates_dir `{}`: {e}", dir.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        for file in &files {
            let yaml = std::fs::read_to_string(file)?;
            self.register(&yaml, None).await.map_err(|e| anyhow::anyhow!("template {}: {e}", file.display()))?;
        }
        Ok(files.len())
    }
}

fn optional(s: &str) -> Option<&str> {
    if s.is_empty() { None } else { Some(s) }
}

#[tonic::async_trait]
impl TemplateService for Templates {
    async fn register_template(
        &self,
        request: Request<pb::RegisterTemplateRequest>,
    ) -> Result<Response<pb::RegisterTemplateResponse>, Status> {
        let caller = caller(&request)?;
        caller.require("templates:register")?;
        Ok(Response::new(self.register(&request.into_inner().yaml, Some(&caller)).await?))
    }

    async fn get_template(&self, request: Request<pb::GetTemplateRequest>) -> Result<Response<pb::Template>, Status> {
        let caller = caller(&request)?;
        caller.require("templates:read")?;
        let r = request.into_inner();
        input::name("namespace", &r.namespace)?;
        input::name("name", &r.name)?;
        input::version("version", &r.version)?;
        caller.require_namespace(&r.namespace)?;
        let record = self.store.template(&r.namespace, &r.name, optional(&r.version)).await.map_err(ApiError::from)?;
        Ok(Response::new(convert::template(&record)))
    }

    async fn list_templates(
        &self,
        request: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        let caller = caller(&request)?;
        caller.require("templates:read")?;
        let r = request.into_inner();
        input::optional_name("namespace", &r.namespace)?;
        if !r.namespace.is_empty() {
            caller.require_namespace(&r.namespace)?;
        }
        let records = self.store.list_templates(optional(&r.namespace)).await.map_err(ApiError::from)?;
        let visible = records.iter().filter(|t| caller.sees(&t.template.namespace)).map(convert::template).collect();
        Ok(Response::new(pb::ListTemplatesResponse { templates: visible }))
    }

    async fn list_namespaces(
        &self,
        request: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        let caller = caller(&request)?;
        caller.require("templates:read")?;
        let namespaces = self.store.list_namespaces().await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListNamespacesResponse {
            namespaces: namespaces
                .into_iter()
                .filter(|(name, _)| caller.sees(name))
                .map(|(name, count)| pb::Namespace { name, template_count: count as u32 })
                .collect(),
        }))
    }
}
