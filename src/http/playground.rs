//! `GET /`: the playground page (HTML, JS and CSS compiled into the binary, nothing fetched
//! from elsewhere). It talks to the server only through the public API, with the API key the
//! user types into it, so the page itself needs no key and holds no data.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const INDEX_HTML: &str = include_str!("playground/index.html");
const SCRIPT_JS: &str = include_str!("playground/playground.js");
const STYLE_CSS: &str = include_str!("playground/playground.css");
const ICON_SVG: &str = include_str!("playground/favicon.svg");

/// The paths served without an API key: static assets that carry no data.
pub const PUBLIC_PATHS: &[&str] = &[
    "/",
    "/playground.js",
    "/playground.css",
    "/favicon.svg",
    "/favicon.ico",
];

/// Same-origin scripts, styles and requests only; no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The assets change with the binary: revalidate instead of caching stale ones.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT_JS)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// The page's icon, also at `/favicon.ico`, which browsers and tools ask for on their own
/// (an SVG there too: every current browser takes it by its content type).
pub async fn icon() -> Response {
    asset("image/svg+xml", ICON_SVG)
}
