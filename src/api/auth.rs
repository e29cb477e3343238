//! The API-key middleware: which scope each route needs, and the check of
//! the request's bearer token against it (the keys themselves: `crate::auth`).

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::error::ApiError;
use crate::auth::{Auth, Scope};

/// The scope a request needs, or `None` for the open operational routes.
pub fn required_scope(method: &Method, path: &str) -> Option<Scope> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (_, ["healthz" | "readyz" | "metrics" | "openapi.yaml"]) => None,
        // The web console's page and assets: its API calls carry the key.
        (&Method::GET | &Method::HEAD, [""] | ["ui", ..]) => None,
        (&Method::POST, ["predict"]) => Some(Scope::Predict),
        (&Method::GET | &Method::HEAD, ["models" | "backbones"] | ["models" | "backbones", _]) => {
            Some(Scope::Predict)
        }
        _ => Some(Scope::Admin),
    }
}

/// Middleware: lets a request through when its route is open, auth is off,
/// or its bearer token's scope covers the route.
pub async fn require_key(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    let Some(needed) = required_scope(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    // Owned copies: the request body is not `Sync`, so no borrow of the
    // request may live across an await.
    let route = format!("{} {}", request.method(), request.uri().path());
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("").to_string());
    match check(&auth, needed, &route, header).await {
        Ok(()) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}

async fn check(
    auth: &Auth,
    needed: Scope,
    route: &str,
    header: Option<String>,
) -> Result<(), ApiError> {
    if !auth.enabled().await? {
        return Ok(());
    }
    let header = header.ok_or_else(|| {
        ApiError::Unauthorized(
            "this route needs an API key: send `Authorization: Bearer <key>`".into(),
        )
    })?;
    let token = header.strip_prefix("Bearer ").ok_or_else(|| {
        ApiError::Unauthorized("the Authorization header must be `Bearer <key>`".into())
    })?;
    let scope = auth.authenticate(token.trim()).await?;
    if scope.allows(needed) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "a `{}` key cannot {route}; it needs an `{}` key",
            scope.as_str(),
            needed.as_str()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_by_route() {
        let admin = Some(Scope::Admin);
        let predict = Some(Scope::Predict);
        assert_eq!(required_scope(&Method::GET, "/healthz"), None);
        assert_eq!(required_scope(&Method::GET, "/metrics"), None);
        assert_eq!(required_scope(&Method::GET, "/"), None);
        assert_eq!(required_scope(&Method::GET, "/ui/jobs/x"), None);
        assert_eq!(required_scope(&Method::POST, "/ui/jobs"), admin);
        assert_eq!(required_scope(&Method::POST, "/predict"), predict);
        assert_eq!(required_scope(&Method::GET, "/models"), predict);
        assert_eq!(required_scope(&Method::GET, "/models/abc"), predict);
        assert_eq!(required_scope(&Method::GET, "/models/abc/export"), admin);
        assert_eq!(required_scope(&Method::POST, "/models/abc/deploy"), admin);
        assert_eq!(required_scope(&Method::POST, "/datasets"), admin);
        assert_eq!(required_scope(&Method::GET, "/jobs"), admin);
        assert_eq!(required_scope(&Method::GET, "/nowhere"), admin);
    }
}
