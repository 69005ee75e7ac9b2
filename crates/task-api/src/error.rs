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
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: &str, problem: impl std::fmt::Display) -> Self {
        ApiError::InvalidArgument(format!("{field}: {problem}"))
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
            e if e.is_unavailable() => ApiError::Unavailable(e.to_string()),
            e => ApiError::Internal(e.to_string()),
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
        ApiError::Unavailable(e.to_string())
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
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        };
        if code == Code::Internal || code == Code::Unavailable {
            tracing::error!(error = %e, ?code, "request failed");
        }
        Status::new(code, e.to_string())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Parses a UUID field, naming it when it is malformed.
pub fn parse_id(field: &str, value: &str) -> ApiResult<uuid::Uuid> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "required"));
    }
    value.parse().map_err(|_| ApiError::invalid(field, format!("`{value}` is not a UUID")))
}
