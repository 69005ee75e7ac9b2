//! StepService: read a step, retry or resolve a failed one.

use tasker_auth::Principal;
use tasker_proto::v1::{self as pb, step_service_server::StepService};
use tasker_store::Actor;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    auth::{Allowed, caller},
    convert,
    error::{ApiError, ApiResult, parse_id, refused_in},
    input, spans,
    tasks::Tasks,
};
use tasker_domain::TraceContext;
use tasker_store::TaskRef;
use tracing::Instrument;

#[derive(Clone)]
pub struct Steps {
    pub(crate) tasks: Tasks,
}

impl Steps {
    /// PERMISSION_DENIED unless the caller holds `permission` and sees the namespace of
    /// the step's task (looked up only for a caller limited to some namespaces).
    async fn require_on_step(&self, caller: &Principal, permission: &str, id: Uuid) -> ApiResult<()> {
        caller.require(permission)?;
        if caller.namespace_limit().is_some() {
            caller.require_namespace(&self.tasks.store.step_ref(id).await?.namespace)?;
        }
        Ok(())
    }

    /// For an operator action: the permission, the namespace and the span of the action
    /// in the task's trace.
    async fn act_on_step(
        &self,
        caller: &Principal,
        permission: &str,
        id: Uuid,
        action: &'static str,
        received: &TraceContext,
    ) -> ApiResult<(tracing::Span, TaskRef)> {
        caller.require(permission)?;
        let task = self.tasks.store.step_ref(id).await?;
        caller.require_namespace(&task.namespace)?;
        Ok((spans::operator(action, &task, received), task))
    }
}

#[tonic::async_trait]
impl StepService for Steps {
    async fn get_step(&self, request: Request<pb::GetStepRequest>) -> Result<Response<pb::Step>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let id = parse_id("step_id", &r.step_id)?;
        self.require_on_step(&caller, "steps:read", id).await?;
        let step = self.tasks.store.step(id, r.include_transitions).await.map_err(ApiError::from)?;
        Ok(Response::new(convert::step(&step)))
    }

    async fn retry_step(&self, request: Request<pb::RetryStepRequest>) -> Result<Response<pb::Step>, Status> {
        let caller = caller(&request)?;
        let received = spans::received(&request);
        let r = request.into_inner();
        let id = parse_id("step_id", &r.step_id)?;
        input::text("reason", &r.reason, input::MAX_TEXT_BYTES)?;
        let (span, task) = self.act_on_step(&caller, "steps:retry", id, "RetryStep", &received).await?;
        let actor = Actor { who: caller.subject, reason: r.reason };
        let retried = async {
            let step = self.tasks.store.retry_step(id, &actor).await.map_err(ApiError::from)?;
            self.tasks.request(step.task_id).await;
            Ok::<_, ApiError>(step)
        };
        let step = retried.instrument(span).await?;
        self.tasks.metrics.action(&task.namespace, &task.name, "retry");
        Ok(Response::new(convert::step(&step)))
    }

    async fn resolve_step(&self, request: Request<pb::ResolveStepRequest>) -> Result<Response<pb::Step>, Status> {
        let caller = caller(&request)?;
        let received = spans::received(&request);
        let r = request.into_inner();
        let id = parse_id("step_id", &r.step_id)?;
        let results = if r.results_json.trim().is_empty() { "{}" } else { r.results_json.as_str() };
        // the children receive these results: the same rules as a handler's
        input::json("results_json", results, self.tasks.limits.max_results_bytes)?;
        input::text("reason", &r.reason, input::MAX_TEXT_BYTES)?;
        let (span, task) = self.act_on_step(&caller, "steps:resolve", id, "ResolveStep", &received).await?;
        let actor = Actor { who: caller.subject, reason: r.reason };
        let resolved = async {
            let step = self.tasks.store.resolve_step(id, results, &actor).await.map_err(refused_in("results_json"))?;
            self.tasks.request(step.task_id).await;
            Ok::<_, ApiError>(step)
        };
        let step = resolved.instrument(span).await?;
        self.tasks.metrics.action(&task.namespace, &task.name, "resolve");
        Ok(Response::new(convert::step(&step)))
    }
}
