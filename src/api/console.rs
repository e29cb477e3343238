//! The web console: the static files of `console/`, embedded at compile
//! time, served at `/` and `/ui/…`. A single-page app: every `/ui/` path
//! but the assets answers `index.html`, whose script routes in the browser.
//! The assets live under `/ui/assets/<version>/…`, `<version>` a hash of
//! all of them, so they are cached for a year and a new build is fetched
//! anew. The page calls the public API like any client, with the key the
//! user enters; loading the page itself needs no key (`auth::required_scope`).

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use super::AppState;
use crate::api::error::ApiError;

/// Only this origin's scripts, styles and API; images also from `data:`
/// (dataset thumbnails) and `blob:` (the photos dropped on the predict page).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

static ASSETS: &[Asset] = &[
    Asset {
        path: "app.js",
        content_type: JS,
        bytes: include_bytes!("../../console/app.js"),
    },
    Asset {
        path: "app.css",
        content_type: CSS,
        bytes: include_bytes!("../../console/app.css"),
    },
    Asset {
        path: "vendor/uplot/uPlot.iife.min.js",
        content_type: JS,
        bytes: include_bytes!("../../console/vendor/uplot/uPlot.iife.min.js"),
    },
    Asset {
        path: "vendor/uplot/uPlot.min.css",
        content_type: CSS,
        bytes: include_bytes!("../../console/vendor/uplot/uPlot.min.css"),
    },
];

/// `index.html` with `{{version}}` where the assets' version goes.
const INDEX_TEMPLATE: &str = include_str!("../../console/index.html");

/// The console's routes (merged into the API's router, behind its layers).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/{*rest}", get(page_or_asset))
}

/// The hash of every asset: the `<version>` in their paths.
fn version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        let mut hash = Sha256::new();
        for asset in ASSETS {
            hash.update(asset.path.as_bytes());
            hash.update((asset.bytes.len() as u64).to_le_bytes());
            hash.update(asset.bytes);
        }
        hex(&hash.finalize()[..6])
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn index_html() -> &'static str {
    static HTML: OnceLock<String> = OnceLock::new();
    HTML.get_or_init(|| INDEX_TEMPLATE.replace("{{version}}", version()))
}

/// Headers every console response carries.
fn hardened(content_type: &'static str, cache: &'static str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut set = |name: HeaderName, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(header::CONTENT_TYPE, content_type);
    set(header::CACHE_CONTROL, cache);
    set(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY);
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(header::REFERRER_POLICY, "no-referrer");
    set(header::X_FRAME_OPTIONS, "DENY");
    headers
}

async fn index() -> Response {
    // Revalidated each time: it names the current assets.
    (
        hardened("text/html; charset=utf-8", "no-cache"),
        index_html(),
    )
        .into_response()
}

async fn page_or_asset(Path(rest): Path<String>, request: HeaderMap) -> Response {
    match rest.strip_prefix("assets/") {
        Some(asset) => serve_asset(asset, &request),
        None => index().await,
    }
}

/// `<version>/<path>`: an asset of this build; other versions are gone.
fn serve_asset(versioned: &str, request: &HeaderMap) -> Response {
    let found = versioned
        .split_once('/')
        .filter(|(v, _)| *v == version())
        .and_then(|(_, path)| ASSETS.iter().find(|a| a.path == path));
    let Some(asset) = found else {
        return ApiError::NotFound(format!("no console asset {versioned:?} in this build"))
            .into_response();
    };
    let etag = etag(asset);
    let mut headers = hardened(asset.content_type, "public, max-age=31536000, immutable");
    headers.insert(header::ETAG, etag.clone());
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (headers, asset.bytes).into_response()
}

/// A strong validator: the asset's content hash.
fn etag(asset: &Asset) -> HeaderValue {
    let tag = format!("\"{}\"", hex(&Sha256::digest(asset.bytes)[..12]));
    HeaderValue::from_str(&tag).expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_each_asset_of_this_build() {
        let html = index_html();
        assert!(!html.contains("{{version}}"));
        for asset in ASSETS {
            let path = format!("/ui/assets/{}/{}", version(), asset.path);
            assert!(html.contains(&path), "index.html does not load {path}");
        }
    }
}
