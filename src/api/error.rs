//! The HTTP error type. Every error leaves as RFC 9457 `application/problem+json`.
//!
//! Lower layers have their own errors (`store::Error`, `DataError`,
//! `ArtifactError`, …); each converts in with `From`, and whatever is not the
//! client's fault is logged and answered as a generic 500.

use axum::extract::multipart::MultipartError;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub use crate::validation::{FieldError, MAX_LISTED_ERRORS};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request could not be read at all.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no API key, or one that is unknown or revoked.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the API key's scope does not cover this route.
    #[error("{0}")]
    Forbidden(String),
    /// 404: the addressed resource does not exist.
    #[error("{0}")]
    NotFound(String),
    /// 405: the path exists but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: the request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is larger than the configured limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 422: the request was read but its content is invalid.
    #[error("{detail}")]
    Invalid {
        detail: String,
        errors: Vec<FieldError>,
        /// Errors found besides `errors` and not kept.
        omitted: usize,
    },
    /// 415: the body's content type is not one this route reads.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 507: the disk is below its free-space floor; nothing was stored.
    #[error("{0}")]
    InsufficientStorage(String),
    /// 503: a dependency is not ready.
    #[error("{0}")]
    Unavailable(String),
    /// 503 with `Retry-After`: too busy right now; try again shortly.
    #[error("{0}")]
    Overloaded(String),
    /// 503 with `Retry-After`: a store the request needs is unreachable for
    /// now (the artifact store restarting, a network cut).
    #[error("{0}")]
    StoreUnavailable(String),
    /// 500: logged in full, shown to clients only as a generic message.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn invalid(detail: impl Into<String>, errors: Vec<FieldError>) -> Self {
        Self::Invalid {
            detail: detail.into(),
            errors,
            omitted: 0,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            Self::Unavailable(_) | Self::Overloaded(_) | Self::StoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'a str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<FieldError>,
    #[serde(skip_serializing_if = "is_zero")]
    errors_omitted: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Longest `path` or `reason` a listed error shows, for the same reason.
const MAX_ERROR_TEXT_BYTES: usize = 4096;

/// The errors a problem document lists, shortened, and how many it leaves out.
fn listed_errors(errors: &[FieldError], omitted: usize) -> (Vec<FieldError>, usize) {
    let shorten = |text: &str| {
        if text.len() <= MAX_ERROR_TEXT_BYTES {
            return text.to_string();
        }
        let end = (0..=MAX_ERROR_TEXT_BYTES)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}…", &text[..end])
    };
    let listed: Vec<FieldError> = errors
        .iter()
        .take(MAX_LISTED_ERRORS)
        .map(|e| FieldError::new(shorten(&e.path), shorten(&e.reason)))
        .collect();
    let omitted = omitted + (errors.len() - listed.len());
    (listed, omitted)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = match &self {
            Self::Internal(err) => {
                tracing::error!(error = ?err, "internal error");
                "internal error; the server log has the details".to_string()
            }
            other => other.to_string(),
        };
        let (errors, errors_omitted) = match &self {
            Self::Invalid {
                errors, omitted, ..
            } => listed_errors(errors, *omitted),
            _ => (Vec::new(), 0),
        };
        let detail = match errors_omitted {
            0 => detail,
            n => format!(
                "{detail} (the first {} of {} errors are listed)",
                errors.len(),
                errors.len() + n
            ),
        };
        let body = Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail,
            errors,
            errors_omitted,
        };
        let json = serde_json::to_vec(&body).expect("problem serializes");
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            json,
        )
            .into_response();
        let headers = response.headers_mut();
        match self {
            Self::Overloaded(_) => {
                headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            Self::StoreUnavailable(_) => {
                headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            }
            Self::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            _ => {}
        }
        response
    }
}

impl From<crate::artifacts::LowDisk> for ApiError {
    fn from(low: crate::artifacts::LowDisk) -> Self {
        Self::InsufficientStorage(format!(
            "{low}; new uploads and jobs wait until space is freed"
        ))
    }
}

/// 401 for a token that is not a valid key; internal when keys could not be read.
impl From<crate::auth::AuthError> for ApiError {
    fn from(err: crate::auth::AuthError) -> Self {
        match err {
            crate::auth::AuthError::UnknownKey => Self::Unauthorized(err.to_string()),
            crate::auth::AuthError::Store(err) => err.into(),
        }
    }
}

/// Internal: whatever the database said is logged, never shown.
impl From<crate::store::Error> for ApiError {
    fn from(err: crate::store::Error) -> Self {
        Self::Internal(err.into())
    }
}

/// 503 while the shared artifact store is unreachable (logged, not shown:
/// its address is the operator's business); internal when it or the local
/// disk failed otherwise.
impl From<crate::artifacts::ArtifactError> for ApiError {
    fn from(err: crate::artifacts::ArtifactError) -> Self {
        if err.is_unavailable() {
            tracing::warn!(error = %err, "the artifact store is unavailable");
            return Self::StoreUnavailable(
                "the artifact store is unreachable right now; retry shortly".into(),
            );
        }
        Self::Internal(err.into())
    }
}

/// Internal: a local file could not be written, moved or read.
impl From<std::io::Error> for ApiError {
    fn from(err: std::io::Error) -> Self {
        Self::Internal(err.into())
    }
}

/// Internal: a blocking task panicked or was cancelled.
impl From<tokio::task::JoinError> for ApiError {
    fn from(err: tokio::task::JoinError) -> Self {
        Self::Internal(err.into())
    }
}

/// An ingest's findings in the upload are the client's (422); its own
/// failures (disk, tensors) are internal.
impl From<crate::data::DataError> for ApiError {
    fn from(err: crate::data::DataError) -> Self {
        match err {
            crate::data::DataError::Invalid {
                detail,
                errors,
                omitted,
            } => Self::Invalid {
                detail,
                errors,
                omitted,
            },
            other => Self::Internal(other.into()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(err) => ApiError::invalid(
                "the JSON body does not match the schema",
                vec![FieldError::new(
                    "body",
                    std::error::Error::source(&err)
                        .map_or_else(|| err.body_text(), |s| s.to_string()),
                )],
            ),
            other => ApiError::BadRequest(other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::invalid(
            "invalid query parameters",
            vec![FieldError::new("query", rejection.body_text())],
        )
    }
}

impl From<MultipartRejection> for ApiError {
    fn from(rejection: MultipartRejection) -> Self {
        let detail = format!(
            "expected a multipart/form-data body: {}",
            rejection.body_text()
        );
        if rejection.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            ApiError::UnsupportedMediaType(detail)
        } else {
            ApiError::BadRequest(detail)
        }
    }
}

impl From<MultipartError> for ApiError {
    fn from(err: MultipartError) -> Self {
        if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("request body too large: {}", err.body_text()))
        } else {
            ApiError::BadRequest(format!("malformed multipart body: {}", err.body_text()))
        }
    }
}
