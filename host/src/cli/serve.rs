//! `serve`: the OpenAI-compatible HTTP server.

use anyhow::{Context, Result};
use std::sync::Arc;

use moehost::experts::tiered::parse_bytes;

use super::ModelArgs;

/// A `--tool-call-parser` name.
fn parse_tool_parser(s: &str) -> Result<moehost::server::tools::ToolParser> {
    moehost::server::tools::ToolParser::parse_name(s).with_context(|| {
        format!("unknown tool-call parser {s:?}: kimi_k2, deepseek_v3 or deepseek_v31")
    })
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Enables the admin API (policies at run time); every admin call needs this bearer token.
    #[arg(long, env = "MOEHOST_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Requests waiting for admission before new ones get HTTP 429.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// An A/B arm beside the default one (repeatable):
    /// NAME=KIND:POLICY[,KIND:POLICY...][,weight:W], e.g. b=eviction:lfu,weight:0.5.
    /// Requests go to arms by weight, or to the arm the x-moehost-arm header names. Each arm
    /// has its own expert store with the same budgets; default=weight:W sets the default
    /// arm's weight (1 unless given).
    #[arg(long = "arm", value_name = "SPEC")]
    pub arms: Vec<moehost::server::arms::ArmSpec>,
    /// A candidate policy that shadows the default arm on a simulated cache of the same
    /// capacity (repeatable): EVICTION or EVICTION+PREFETCH, e.g. lfu+transitions.
    /// Hit rates are in /metrics (moehost_shadow_*) and GET /admin/policies.
    #[arg(long = "shadow", value_name = "POLICIES")]
    pub shadows: Vec<moehost::server::shadow::ShadowSpec>,
    /// How the model writes tool calls (vLLM's names): kimi_k2, deepseek_v3 (V3, R1),
    /// deepseek_v31. Default: detected from the tokenizer's markers and the chat template.
    #[arg(long, value_parser = parse_tool_parser)]
    pub tool_call_parser: Option<moehost::server::tools::ToolParser>,
    /// Open connections at once; past it new connections get HTTP 503 and are closed.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's head (and a kept-alive connection may sit
    /// idle); then the connection is closed.
    #[arg(long, default_value = "30", value_parser = moehost::server::listen::parse_seconds)]
    pub header_timeout: std::time::Duration,
    /// Seconds a client has to send a request's body once its head is in; then HTTP 408.
    #[arg(long, default_value = "60", value_parser = moehost::server::listen::parse_seconds)]
    pub body_timeout: std::time::Duration,
    /// Largest request body (prompts, chats, plugin uploads); larger ones get HTTP 413.
    #[arg(long, value_parser = parse_bytes, default_value = "8MiB")]
    pub body_limit: u64,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let ServeArgs {
        model,
        addr,
        admin_token,
        queue,
        arms,
        shadows,
        tool_call_parser,
        max_connections,
        header_timeout,
        body_timeout,
        body_limit,
    } = a;
    let config = model.store_config()?;
    let (engine, store) = model.open_with(&config)?;
    let opts = moehost::server::ServeOptions {
        queue_capacity: queue,
        admin_token,
        arms,
        shadows,
        tool_call_parser,
        conn: moehost::server::listen::ConnLimits {
            max_connections,
            header_timeout,
            body_timeout,
        },
        body_limit: usize::try_from(body_limit).unwrap_or(usize::MAX),
    };
    let (state, scheduler, _) = moehost::server::start(Arc::new(engine), store, &config, &opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!(
            "moehost: serving {} on http://{} (arms: {}; admin API {})",
            state.model_name,
            listener.local_addr()?,
            state.arms.names().join(", "),
            if state.admin.is_some() { "on" } else { "off" }
        );
        moehost::server::serve_on(listener, state, &opts, moehost::server::shutdown_signal()).await
    })?;
    // The handlers are gone, so the queue is closed: the scheduler finishes and exits.
    let _ = scheduler.join();
    Ok(())
}
