//! Request ids and the access log: one line per request at `info` on target `moehost::access`.
//!
//! A request keeps the `x-request-id` its client sent when it is short and plain (so a gateway's
//! ids carry through), else gets a fresh one; either way the response carries it back and every
//! log line the request causes inside its span names it. `RUST_LOG` chooses what is printed
//! (`RUST_LOG=moehost::access=off` silences the access log).

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tracing::Instrument;

pub const REQUEST_ID: &str = "x-request-id";

/// The id of a request, in its extensions for handlers that want it.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Longest client-given id kept.
const MAX_ID_LEN: usize = 64;

fn fresh_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(rand::random::<u32>);
    format!("{prefix:08x}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn usable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Tags the request with its id, answers with it, and logs the request when its response head
/// is ready (for a stream: when streaming starts).
pub async fn log_request(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| usable(v))
        .map_or_else(fresh_id, str::to_owned);
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let span = tracing::info_span!("request", id = %id);
    let mut response = next.run(req).instrument(span.clone()).await;
    let _in_span = span.enter();
    tracing::info!(
        target: "moehost::access",
        %method,
        path = ?path,
        status = response.status().as_u16(),
        ms = (started.elapsed().as_secs_f64() * 1e3 * 10.0).round() / 10.0,
    );
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

/// Logs to stderr, filtered by `RUST_LOG` (default: warnings, and moehost's own info lines).
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,moehost=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_kept_only_when_short_and_plain() {
        assert!(usable("gw-1234:abc.def_0"));
        assert!(!usable(""));
        assert!(!usable("a\"b"));
        assert!(!usable("line\nbreak"));
        assert!(!usable(&"x".repeat(MAX_ID_LEN + 1)));
        let (a, b) = (fresh_id(), fresh_id());
        assert!(usable(&a) && usable(&b) && a != b);
    }
}
