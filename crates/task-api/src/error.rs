//! Every error the API returns, and its gRPC status: the one place the mapping lives.

use tasker_domain::{TemplateError, template::ContextError};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: &str, problem: impl std::fmt::Display) -> Self {
        ApiError::InvalidArgument(format!("{field}: {problem}"))
    }

    /// Every call's answer while task-api waits for its database at start.
    pub fn waiting_for_database() -> Self {
        ApiError::Unavailable("task-api is starting: its database is out of reach; try again".into())
    }

    /// This error as a whole gRPC response (for answers made outside a generated service).
    pub fn into_http(self) -> tonic::codegen::http::Response<tonic::body::Body> {
        let (parts, ()) = Status::from(self).into_http::<()>().into_parts();
        tonic::codegen::http::Response::from_parts(parts, tonic::body::Body::empty())
    }
}

impl From<tasker_store::Error> for ApiError {
    fn from(e: tasker_store::Error) -> Self {
        use tasker_store::Error as E;
        match e {
            E::NotFound(m) => ApiError::NotFound(m),
            E::AlreadyExists(m) => ApiError::AlreadyExists(m),
            E::FailedPrecondition(m) => ApiError::FailedPrecondition(m),
            E::InvalidArgument(m) => ApiError::InvalidArgument(m),
            E::IllegalTransition(t) => ApiError::FailedPrecondition(t.to_string()),
            E::Superseded(m) => ApiError::Aborted(format!("{m} while the task was being created; try again")),
            // the server's own words stay in the log: they may quote the request, and they
            // are no use to a client
            e if e.is_unavailable() => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::Unavailable("the database is unavailable; try again".into())
            }
            e if e.is_refused_value() => {
                tracing::warn!(error = %e, "database refused a value");
                ApiError::InvalidArgument("the request holds a value the database cannot store".into())
            }
            e => {
                tracing::error!(error = %e, "database error");
                ApiError::Internal("internal error (logged by task-api)".into())
            }
        }
    }
}

impl From<TemplateError> for ApiError {
    fn from(e: TemplateError) -> Self {
        match e {
            TemplateError::TooLarge { .. } => ApiError::TooLarge(format!("yaml: {e}")),
            e => ApiError::InvalidArgument(e.to_string()),
        }
    }
}

impl From<ContextError> for ApiError {
    fn from(e: ContextError) -> Self {
        ApiError::InvalidArgument(format!("context_json: {e}"))
    }
}

impl From<tasker_messaging::Error> for ApiError {
    fn from(e: tasker_messaging::Error) -> Self {
        tracing::warn!(error = %e, "broker unavailable");
        ApiError::Unavailable("the message broker is unavailable; try again".into())
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = match &e {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::TooLarge(_) => Code::ResourceExhausted,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Aborted(_) => Code::Aborted,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Internal(_) => Code::Internal,
        };
        if code == Code::Internal || code == Code::Unavailable {
            tracing::error!(error = %e, ?code, "request failed");
        }
        Status::new(code, bounded(e.to_string()))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A store error where the only payload the database could refuse is `field` (every other
/// field was checked before): names it.
pub fn refused_in(field: &str) -> impl FnOnce(tasker_store::Error) -> ApiError + '_ {
    move |e| {
        if e.is_refused_value() {
            tracing::info!(error = %e, field, "database refused a value");
            ApiError::invalid(field, "holds a value the database cannot store (e.g. a number beyond its range)")
        } else {
            e.into()
        }
    }
}

/// Parses a UUID field, naming it when it is malformed.
pub fn parse_id(field: &str, value: &str) -> ApiResult<uuid::Uuid> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "required"));
    }
    value.parse().map_err(|_| ApiError::invalid(field, format!("{} is not a UUID", tasker_domain::quote(value))))
}

/// Longest status message sent (bytes): messages quote only short prefixes of input, and
/// this bounds whatever else may grow (a status travels in HTTP/2 headers, which clients
/// limit).
const MAX_MESSAGE_BYTES: usize = 1024;

fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let cut = (0..=MAX_MESSAGE_BYTES).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
        message.truncate(cut);
        message.push('…');
    }
    message
}
