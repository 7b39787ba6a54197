//! `GET /`: the live web console, one self-contained page built into the binary. It reads only
//! `GET /v1/events:stream` and `GET /v1/stats`, so it sees exactly what any other client sees and
//! needs the same `token` (passed on from the page's own URL).

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};

const HTML: &str = include_str!("console.html");
const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");

/// The page with its stylesheet and script inlined, assembled once.
static PAGE: LazyLock<String> = LazyLock::new(|| {
    HTML.replacen("/*CONSOLE_CSS*/", CSS, 1)
        .replacen("/*CONSOLE_JS*/", JS, 1)
});

/// What the page may do: run its own inline script and style, talk to this origin, nothing else
/// (no external loads, no framing).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE.as_str(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_inlines_its_stylesheet_and_script() {
        assert!(!PAGE.contains("/*CONSOLE_CSS*/") && !PAGE.contains("/*CONSOLE_JS*/"));
        assert!(PAGE.contains(CSS) && PAGE.contains(JS));
        for external in ["src=\"http", "href=\"http", "url(http", "@import"] {
            assert!(!PAGE.contains(external), "no external loads: {external}");
        }
    }
}
