//! `moehost serve`: an OpenAI-compatible HTTP server (axum + tokio) over the engine and its
//! tiered expert store, with continuous batching, Prometheus metrics and an admin API for
//! policies.
//!
//! Owns: routing, request limits, start-up and graceful shutdown. The model
//! runs on one scheduler thread (`scheduler`); handlers only talk to it through a bounded queue.
//! Requests are routed to A/B policy arms (`arms`); shadow policies (`shadow`) replay the
//! default arm's traffic on simulated caches.

pub mod access;
pub mod admin;
pub mod answer;
pub mod arms;
pub mod listen;
pub mod metrics;
pub mod openai;
pub mod prep;
pub mod reasoning;
pub mod scheduler;
pub mod shadow;
pub mod tokenize;
pub mod tools;

use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::sync::mpsc;

use crate::engine::Engine;
use crate::experts::tiered::{StoreConfig, TieredExperts};
use metrics::Metrics;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Requests waiting for admission before new ones get 429.
    pub queue_capacity: usize,
    /// Largest request body, bytes (plugin uploads included).
    pub body_limit: usize,
    /// Enables the admin API.
    pub admin_token: Option<String>,
    /// A/B arms beside the default one.
    pub arms: Vec<arms::ArmSpec>,
    /// Candidate policies shadowing the default arm on simulated caches.
    pub shadows: Vec<shadow::ShadowSpec>,
    /// The tool-call syntax to parse; `None`: detected from the tokenizer and chat template.
    pub tool_call_parser: Option<tools::ToolParser>,
    /// Connection cap and read timeouts.
    pub conn: listen::ConnLimits,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 256,
            body_limit: 8 << 20,
            admin_token: None,
            arms: Vec::new(),
            shadows: Vec::new(),
            tool_call_parser: None,
            conn: listen::ConnLimits::default(),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    /// The default arm's store.
    pub store: Arc<TieredExperts>,
    pub arms: Arc<arms::Arms>,
    pub shadows: Arc<Option<shadow::Shadows>>,
    pub queue: mpsc::Sender<scheduler::GenRequest>,
    pub metrics: Arc<Metrics>,
    pub model_name: String,
    pub admin: Option<Arc<admin::Admin>>,
    /// How this model writes tool calls, if known.
    pub tool_parser: Option<tools::ToolParser>,
}

/// Builds the state and starts the scheduler thread.
pub fn start(
    engine: Arc<Engine>,
    store: Arc<TieredExperts>,
    store_config: &StoreConfig,
    opts: &ServeOptions,
) -> Result<(AppState, std::thread::JoinHandle<()>, Arc<AtomicBool>)> {
    let tool_parser = opts.tool_call_parser.or_else(|| {
        tools::ToolParser::detect(
            &engine.tokenizer,
            engine.chat_template.as_ref().map(|t| t.text.as_str()),
        )
    });
    let (tx, rx) = mpsc::channel(opts.queue_capacity.max(1));
    let metrics = Arc::new(Metrics::default());
    let _ = metrics.started.set(std::time::Instant::now());
    let stopping = Arc::new(AtomicBool::new(false));
    let model_name = engine
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let arms = Arc::new(arms::Arms::build(
        &engine,
        store.clone(),
        store_config,
        &opts.arms,
    )?);
    let shadows = if opts.shadows.is_empty() {
        None
    } else {
        Some(shadow::Shadows::start(
            arms::DEFAULT_ARM,
            &store,
            &store_config.eviction,
            &store_config.prefetch,
            &opts.shadows,
            store_config.limits,
        )?)
    };
    let admin = match &opts.admin_token {
        Some(t) => Some(Arc::new(admin::Admin::new(t.clone(), &arms)?)),
        None => None,
    };
    let (e, a, m, s) = (
        engine.clone(),
        arms.clone(),
        metrics.clone(),
        stopping.clone(),
    );
    let worker = std::thread::Builder::new()
        .name("moehost-scheduler".into())
        .spawn(move || scheduler::run(e, a, rx, m, s))
        .context("cannot start the scheduler thread")?;
    Ok((
        AppState {
            engine,
            store,
            arms,
            shadows: Arc::new(shadows),
            queue: tx,
            metrics,
            model_name,
            admin,
            tool_parser,
        },
        worker,
        stopping,
    ))
}

/// The HTTP routes, each request's body read within `body_timeout` and logged with its id.
pub fn router(state: AppState, body_limit: usize, body_timeout: std::time::Duration) -> Router {
    Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/health", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(
                |axum::extract::State(s): axum::extract::State<AppState>| async move {
                    // The store's locks may be held by the forward thread: not on a worker.
                    let text =
                        tokio::task::spawn_blocking(move || s.metrics.render(&s.arms, &s.shadows))
                            .await
                            .unwrap_or_default();
                    (
                        [(axum::http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
                        text,
                    )
                },
            ),
        )
        .route("/admin/policies", post(admin::upload).get(admin::list))
        .route("/admin/policies/activate", post(admin::activate))
        .route("/admin/policies/rollback", post(admin::rollback))
        .layer(axum::middleware::from_fn_with_state(
            (body_timeout, body_limit),
            listen::body_deadline,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(access::log_request))
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves; in-flight requests finish first.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    app: AppState,
    opts: &ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let routes = router(app, opts.body_limit, opts.conn.body_timeout);
    listen::serve(listener, routes, opts.conn, shutdown).await
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down; finishing requests in flight");
}
