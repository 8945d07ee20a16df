//! The OpenAI-compatible endpoints: `/v1/completions`, `/v1/chat/completions` (streaming with
//! server-sent events and not), `/v1/models`, and OpenAI's error shape.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

use super::scheduler::{next_id, GenEvent, GenRequest};
use super::AppState;
use crate::sampling::SamplingParams;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param: None,
        }
    }

    pub fn status(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A completions prompt as OpenAI takes it: text, or token ids (a single prompt of either).
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

/// Fields shared by both endpoints (unknown fields are ignored, as OpenAI's clients send many).
#[derive(Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream: Option<bool>,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::status(
                status,
                "invalid_request_error",
                "request body is larger than the server's limit",
            )
        } else {
            ApiError::status(
                status,
                "invalid_request_error",
                format!("cannot read the request body: {e}"),
            )
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("invalid request JSON: {e}")))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

pub async fn completions(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let result = async {
        let arm = pick_arm(&app, &headers)?;
        let b: CompletionBody = parse(body)?;
        let one = || {
            ApiError::invalid(
                "prompt must be one string or one list of token ids (batches of prompts are not supported)",
            )
        };
        let text = match b.prompt {
            Prompt::Text(t) => Some(t),
            Prompt::Texts(v) if v.len() == 1 => v.into_iter().next(),
            Prompt::Ids(ids) => return run_ids(app.clone(), arm, ids, b.common).await,
            Prompt::IdLists(v) if v.len() == 1 => {
                let ids = v.into_iter().next().unwrap_or_default();
                return run_ids(app.clone(), arm, ids, b.common).await;
            }
            Prompt::Texts(_) | Prompt::IdLists(_) => return Err(one()),
        };
        let ids = app
            .engine
            .encode(&text.unwrap_or_default())
            .map_err(|e| ApiError::invalid(format!("{e:#}")))?;
        run(app.clone(), arm, Kind::Completion, ids, b.common).await
    }
    .await;
    finish(&app, result)
}

/// A completion of a prompt given as token ids, each checked against the vocabulary.
async fn run_ids(
    app: AppState,
    arm: usize,
    ids: Vec<u32>,
    common: Common,
) -> Result<Response, ApiError> {
    let vocab = app.engine.model.config().vocab_size;
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError {
            param: Some("prompt"),
            ..ApiError::invalid(format!(
                "token id {bad} in the prompt is out of range (vocab_size {vocab})"
            ))
        });
    }
    run(app, arm, Kind::Completion, ids, common).await
}

pub async fn chat_completions(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let result = async {
        let arm = pick_arm(&app, &headers)?;
        let b: ChatBody = parse(body)?;
        if b.messages.is_empty() {
            return Err(ApiError::invalid("messages must not be empty"));
        }
        let text = app.render_chat(
            &b.messages
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_str()))
                .collect::<Vec<_>>(),
        )?;
        let ids = app
            .engine
            .encode(&text)
            .map_err(|e| ApiError::invalid(format!("{e:#}")))?;
        run(app.clone(), arm, Kind::Chat, ids, b.common).await
    }
    .await;
    finish(&app, result)
}

fn finish(app: &AppState, r: Result<Response, ApiError>) -> Response {
    match r {
        Ok(resp) => {
            app.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
            resp
        }
        Err(e) => {
            let counter = if e.status == StatusCode::TOO_MANY_REQUESTS
                || e.status == StatusCode::SERVICE_UNAVAILABLE
            {
                &app.metrics.requests_rejected
            } else {
                &app.metrics.requests_client_error
            };
            counter.fetch_add(1, Ordering::Relaxed);
            e.into_response()
        }
    }
}

/// The request's arm: the `x-moehost-arm` header's, else the next by weight.
fn pick_arm(app: &AppState, headers: &HeaderMap) -> Result<usize, ApiError> {
    let header = match headers.get(super::arms::ARM_HEADER) {
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::invalid(format!(
                "the {} header is not text",
                super::arms::ARM_HEADER
            ))
        })?),
        None => None,
    };
    app.arms.pick(header).map_err(ApiError::invalid)
}

async fn run(
    app: AppState,
    arm: usize,
    kind: Kind,
    prompt_ids: Vec<u32>,
    c: Common,
) -> Result<Response, ApiError> {
    let cfg = app.engine.model.config();
    if let Some(m) = &c.model {
        if m != &app.model_name {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "model {m:?} does not exist; this server serves {:?}",
                    app.model_name
                ),
                kind: "invalid_request_error",
                code: Some("model_not_found"),
                param: Some("model"),
            });
        }
    }
    if c.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid("only n = 1 is supported"));
    }
    let limit = cfg.max_position_embeddings;
    if prompt_ids.is_empty() {
        return Err(ApiError {
            param: Some("prompt"),
            ..ApiError::invalid("the prompt is empty (it encodes to no tokens)")
        });
    }
    // OpenAI's defaults: 16 tokens for completions; for chat, up to the context length.
    let default_max = match kind {
        Kind::Completion => 16,
        Kind::Chat => limit.saturating_sub(prompt_ids.len()).max(1) as u64,
    };
    let max_tokens = c
        .max_completion_tokens
        .or(c.max_tokens)
        .unwrap_or(default_max) as usize;
    if max_tokens > limit {
        return Err(ApiError {
            param: Some("max_tokens"),
            ..ApiError::invalid(format!(
                "max_tokens is {max_tokens}, above this model's limit of {limit}"
            ))
        });
    }
    if prompt_ids.len() + max_tokens > limit {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            param: Some("messages"),
            ..ApiError::invalid(format!(
                "this model's maximum context length is {limit} tokens; the prompt has {} and max_tokens asks for {max_tokens}",
                prompt_ids.len()
            ))
        });
    }
    let params = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_k: 0,
        top_p: c.top_p.unwrap_or(1.0),
        seed: c.seed.unwrap_or_else(next_id),
    };
    params
        .validate()
        .map_err(|e| ApiError::invalid(format!("{e:#}")))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let request = GenRequest {
        arm,
        prompt_ids,
        max_tokens,
        params,
        stop: c.stop.map(OneOrMany::into_vec).unwrap_or_default(),
        events: tx,
        received: Instant::now(),
    };
    app.queue.try_send(request).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => ApiError::status(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "the server's request queue is full; retry later",
        ),
        mpsc::error::TrySendError::Closed(_) => ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        ),
    })?;
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        next_id()
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let model = app.model_name.clone();
    if c.stream.unwrap_or(false) {
        // Server-sent events; dropping the stream (client gone) closes `rx`, which cancels.
        let stream = async_stream(id, created, model, kind, rx);
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Text(t) => text.push_str(&t),
            GenEvent::Error(e) => {
                return Err(ApiError::status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    e,
                ))
            }
            GenEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                   "total_tokens": prompt_tokens + completion_tokens});
                let body = match kind {
                    Kind::Completion => {
                        json!({"id": id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason}],
                        "usage": usage})
                    }
                    Kind::Chat => {
                        json!({"id": id, "object": "chat.completion", "created": created, "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "logprobs": null, "finish_reason": finish_reason}],
                        "usage": usage})
                    }
                };
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(ApiError::status(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "generation was cancelled",
    ))
}

fn chunk(
    id: &str,
    created: u64,
    model: &str,
    kind: Kind,
    text: Option<&str>,
    finish: Option<&str>,
    first: bool,
) -> Value {
    match kind {
        Kind::Completion => {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text.unwrap_or(""), "index": 0, "logprobs": null, "finish_reason": finish}]})
        }
        Kind::Chat => {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        }
    }
}

fn async_stream(
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    rx: mpsc::UnboundedReceiver<GenEvent>,
) -> impl futures_core::Stream<Item = Result<Event, Infallible>> {
    struct S {
        rx: mpsc::UnboundedReceiver<GenEvent>,
        first: bool,
        done: u8,
    }
    let state = S {
        rx,
        first: true,
        done: 0,
    };
    futures_util::stream::unfold(state, move |mut s| {
        let (id, model) = (id.clone(), model.clone());
        async move {
            match s.done {
                1 => {
                    s.done = 2;
                    return Some((Ok(Event::default().data("[DONE]")), s));
                }
                2 => return None,
                _ => {}
            }
            let ev = match s.rx.recv().await {
                Some(GenEvent::Text(t)) => {
                    let c = chunk(&id, created, &model, kind, Some(&t), None, s.first);
                    s.first = false;
                    Event::default().data(c.to_string())
                }
                Some(GenEvent::Done { finish_reason, .. }) => {
                    s.done = 1;
                    let c = chunk(
                        &id,
                        created,
                        &model,
                        kind,
                        None,
                        Some(finish_reason),
                        s.first,
                    );
                    Event::default().data(c.to_string())
                }
                Some(GenEvent::Error(e)) => {
                    s.done = 1;
                    Event::default().data(json!({"error": {"message": e, "type": "server_error", "param": null, "code": null}}).to_string())
                }
                None => return None,
            };
            Some((Ok(ev), s))
        }
    })
}

pub async fn models(State(app): State<AppState>) -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": app.model_name, "object": "model", "created": 0, "owned_by": "moehost"}]}),
    )
}
