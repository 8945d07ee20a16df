//! The accept loop: HTTP/1.1 connections with limits one slow or greedy client cannot get past.
//!
//! Owns: the connection cap, the header read timeout (slowloris), the request body deadline and
//! graceful shutdown. Does not own routes or per-request limits (`server::router`, handlers).
//!
//! axum's `serve` sets no timer, so hyper never times out a request head: a client sending one
//! header byte a minute held its connection forever. Here every connection is served by
//! hyper's HTTP/1 builder with a timer; the head must arrive within `header_timeout` (also the
//! idle time a keep-alive connection may wait for its next request), the body within
//! `body_timeout`, and past `max_connections` new connections get a 503 and are closed.

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

/// Connection-level limits (`moehost serve --header-timeout/--body-timeout/--max-connections`).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open connections at once; more get 503 and are closed.
    pub max_connections: usize,
    /// Time allowed to send a request's head, and to start the next one on a kept-alive connection.
    pub header_timeout: Duration,
    /// Time allowed to send a request's whole body once its head is in.
    pub body_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
        }
    }
}

/// Reads the request body in full within the body deadline, so a handler never waits on a
/// client that trickles its body; over the deadline the answer is 408 and the connection closes.
pub async fn body_deadline(
    axum::extract::State(limit): axum::extract::State<(Duration, usize)>,
    req: Request,
    next: Next,
) -> Response {
    let (timeout, max_bytes) = limit;
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, max_bytes)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => super::openai::ApiError::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than the {max_bytes}-byte limit, or was cut short"),
        )
        .into_response(),
        Err(_) => {
            let mut r = super::openai::ApiError::status(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs_f64()
                ),
            )
            .into_response();
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            r
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting and waits for
/// the connections in flight to finish their requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let conn =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // Errors here are the client's (reset, head timeout): nothing to answer.
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Answers a connection over the cap with 503 and closes it, without reading its request.
async fn refuse(mut stream: tokio::net::TcpStream, cap: usize) {
    let body = format!(
        "{{\"error\":{{\"message\":\"the server has its maximum of {cap} connections open; retry later\",\"type\":\"server_error\",\"param\":null,\"code\":null}}}}"
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}

/// Parses a duration in seconds (`--header-timeout 30`, `0.5`).
pub fn parse_seconds(s: &str) -> Result<Duration> {
    let secs: f64 = s
        .parse()
        .with_context(|| format!("{s:?} is not a number of seconds"))?;
    anyhow::ensure!(
        secs.is_finite() && secs > 0.0 && secs <= 86_400.0,
        "{s} s is not a usable timeout (0 < seconds <= 86400)"
    );
    Ok(Duration::from_secs_f64(secs))
}
