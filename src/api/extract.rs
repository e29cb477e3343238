//! Extractors whose rejections are problem+json like every other error.

use axum::extract::{FromRequest, FromRequestParts, Request};
use serde::de::DeserializeOwned;

use super::text;
use crate::api::error::{ApiError, FieldError};

/// A JSON body, refused (naming the field) when a string holds text
/// Postgres cannot store.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(value) =
            axum::Json::<serde_json::Value>::from_request(request, state).await?;
        if let Some(pointer) = text::nul_in_json(&value) {
            return Err(text::nul_in_body(pointer));
        }
        serde_json::from_value(value).map(ApiJson).map_err(|err| {
            ApiError::invalid(
                "the JSON body does not match the schema",
                vec![FieldError::new("body", err.to_string())],
            )
        })
    }
}

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);
