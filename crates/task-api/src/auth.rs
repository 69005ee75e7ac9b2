//! The one gate every API call passes (a tonic interceptor on each service; health is not
//! behind it): it authenticates the caller and leaves a [`Principal`] in the request for
//! the RPC to check permissions and namespaces against before it reads or writes.

use std::sync::Arc;

use tasker_auth::{Mode, Principal, Settings, Verifier};
use tonic::{Request, Status, metadata::MetadataMap, service::Interceptor};

use crate::error::{ApiError, ApiResult};

#[derive(Clone)]
pub(crate) struct Gate(Arc<Option<Verifier>>);

impl Gate {
    pub(crate) fn new(settings: &Settings) -> anyhow::Result<Gate> {
        match settings.mode {
            Mode::None => Ok(Gate(Arc::new(None))),
            Mode::Jwt => Ok(Gate(Arc::new(Some(Verifier::new(settings).map_err(anyhow::Error::msg)?)))),
        }
    }
}

impl Interceptor for Gate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let principal = match self.0.as_ref() {
            None => Principal::unrestricted(header_actor(request.metadata())),
            Some(verifier) => {
                let metadata = request.metadata();
                let bearer = metadata
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v).trim());
                let api_key = metadata.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim);
                verifier
                    .authenticate(bearer, api_key)
                    .map_err(|e| Status::from(ApiError::Unauthenticated(e.to_string())))?
            }
        };
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// Who an action is recorded as when there is no authentication: the `x-tasker-actor`
/// header (taskerctl sends the user's name), else `anonymous`.
fn header_actor(metadata: &MetadataMap) -> String {
    metadata
        .get("x-tasker-actor")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(|v| v.chars().take(128).collect())
        .unwrap_or_else(|| "anonymous".to_owned())
}

/// The caller the gate let in.
pub(crate) fn caller<T>(request: &Request<T>) -> ApiResult<Principal> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| ApiError::Internal("no caller on the request".into()))
}

/// Checks against a caller, before anything is read or written.
pub(crate) trait Allowed {
    /// PERMISSION_DENIED unless the caller holds `permission`.
    fn require(&self, permission: &str) -> ApiResult<()>;
    /// PERMISSION_DENIED unless the caller may touch `namespace`.
    fn require_namespace(&self, namespace: &str) -> ApiResult<()>;
}

impl Allowed for Principal {
    fn require(&self, permission: &str) -> ApiResult<()> {
        if self.allows(permission) {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied(format!("`{permission}` is required")))
        }
    }

    fn require_namespace(&self, namespace: &str) -> ApiResult<()> {
        if self.sees(namespace) {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied(format!("no access to namespace {}", tasker_domain::quote(namespace))))
        }
    }
}
