//! Requests a web page on another site sends. A browser lets any page POST
//! a form (multipart included) to any address without asking first, so a
//! page could drive a server on loopback that has no keys yet. Such
//! requests carry an `Origin` (and `Sec-Fetch-Site`) header: they are
//! refused unless that origin is the server's own or a configured CORS
//! origin. Reads (GET, HEAD) change nothing and a page cannot see their
//! answers without CORS, so links to the server keep working. Clients that
//! are not browsers send neither header and are unaffected.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::error::ApiError;

/// Middleware: 403 for a request that changes something, sent by a page of
/// another origin.
pub async fn refuse_other_sites(
    State(allowed): State<Arc<Vec<String>>>,
    request: Request,
    next: Next,
) -> Response {
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return next.run(request).await;
    }
    match foreign_origin(request.headers(), &allowed) {
        None => next.run(request).await,
        Some(origin) => ApiError::Forbidden(format!(
            "requests from web pages of other origins ({origin}) are refused; the operator \
             allows an origin with --cors-origins"
        ))
        .into_response(),
    }
}

/// The origin a request came from when it is neither this server nor an
/// allowed one.
fn foreign_origin(headers: &HeaderMap, allowed: &[String]) -> Option<String> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let origin = text(header::ORIGIN);
    let cross_site = text(HeaderName::from_static("sec-fetch-site")) == Some("cross-site");
    let allowed_origin = |o: &str| allowed.iter().any(|a| a == "*" || a.trim() == o);
    match origin {
        Some(origin) => {
            let own = text(header::HOST)
                .is_some_and(|host| origin.split_once("://").is_some_and(|(_, h)| h == host));
            (!own && !allowed_origin(origin)).then(|| origin.chars().take(100).collect())
        }
        // Fetch metadata without an Origin (a cross-site navigation or GET).
        None if cross_site && !allowed.iter().any(|a| a == "*") => Some("another site".into()),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn only_other_origins_are_foreign() {
        let none: Vec<String> = Vec::new();
        assert_eq!(foreign_origin(&headers(&[]), &none), None);
        let own = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ]);
        assert_eq!(foreign_origin(&own, &none), None);
        let other = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://evil.example"),
        ]);
        assert_eq!(
            foreign_origin(&other, &none).as_deref(),
            Some("http://evil.example")
        );
        let port = headers(&[
            ("host", "localhost:8080"),
            ("origin", "http://localhost:3000"),
        ]);
        assert!(foreign_origin(&port, &none).is_some());
        let allowed = vec!["http://evil.example".to_string()];
        assert_eq!(foreign_origin(&other, &allowed), None);
        let fetch = headers(&[("sec-fetch-site", "cross-site")]);
        assert!(foreign_origin(&fetch, &none).is_some());
        let null = headers(&[("host", "127.0.0.1:8080"), ("origin", "null")]);
        assert!(foreign_origin(&null, &none).is_some());
    }
}
