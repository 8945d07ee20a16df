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
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

use super::answer::ChatRead;
use super::scheduler::{next_id, GenEvent, GenRequest};
use super::AppState;
use crate::model::sampling::SamplingParams;

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

    /// The server's own failure (500, `server_error`).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

#[derive(Deserialize, Clone)]
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

/// Stop strings a request may give (OpenAI takes 4; vLLM any number), and their length: every
/// step searches the new text for each of them.
const MAX_STOPS: usize = 32;
const MAX_STOP_BYTES: usize = 1024;

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
#[derive(Deserialize, Clone)]
pub(super) struct Common {
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
    /// Completions: how many alternatives per token (0-5). Chat: `true` to report them.
    #[serde(default)]
    logprobs: Option<Value>,
    /// Chat: alternatives per token (0-20), with `logprobs: true`.
    #[serde(default)]
    top_logprobs: Option<u64>,
    /// Token id (as a string) -> bias in [-100, 100] added to its logit.
    #[serde(default)]
    logit_bias: Option<std::collections::HashMap<String, f32>>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}`.
    #[serde(default)]
    response_format: Option<Value>,
    /// `{"include_usage": true}`: a last chunk with the usage before `[DONE]`.
    #[serde(default)]
    stream_options: Option<Value>,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
pub(super) struct ChatBody {
    /// OpenAI's message objects, handed to the chat template as they are (checked first).
    messages: Vec<Value>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    /// Extra template variables (e.g. `{"thinking": true}`), as vLLM and SGLang take them.
    #[serde(default)]
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// Open the assistant's turn at the end of the prompt (default true; vLLM's extension).
    #[serde(default)]
    add_generation_prompt: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

/// Checks the message objects the template will see: an object with a string `role`;
/// `content` a string, null, or a list of parts with a `type`; `tool_calls` a list of
/// `{id?, type, function: {name, arguments}}`.
fn check_messages(messages: &[Value]) -> Result<(), ApiError> {
    let bad = |i: usize, what: &str| ApiError {
        param: Some("messages"),
        ..ApiError::invalid(format!("messages[{i}]: {what}"))
    };
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    for (i, m) in messages.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            return Err(bad(i, "must be an object"));
        };
        let Some(role) = obj.get("role").and_then(Value::as_str) else {
            return Err(bad(i, "needs a string role"));
        };
        match obj.get("content") {
            None | Some(Value::Null) if role == "assistant" => {}
            None | Some(Value::Null) => return Err(bad(i, "needs content")),
            Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                if parts
                    .iter()
                    .any(|p| p.get("type").and_then(Value::as_str).is_none())
                {
                    return Err(bad(i, "content parts need a string type"));
                }
            }
            Some(_) => return Err(bad(i, "content must be a string, null or a list of parts")),
        }
        if let Some(calls) = obj.get("tool_calls").filter(|c| !c.is_null()) {
            let ok = calls.as_array().is_some_and(|calls| {
                calls.iter().all(|c| {
                    let f = &c["function"];
                    f["name"].is_string()
                        && (f["arguments"].is_string() || f["arguments"].is_object())
                })
            });
            if !ok {
                return Err(bad(
                    i,
                    "tool_calls must be a list of {\"function\": {\"name\", \"arguments\"}}",
                ));
            }
        }
    }
    Ok(())
}

/// How a chat offering tools is answered: the parser, whether every call is kept, and the
/// start of a call written for the model when `tool_choice` demands one.
struct ToolPlan {
    parser: super::tools::ToolParser,
    parallel: bool,
    forced: Option<Forced>,
}

/// Whether the model's output is parsed for tool calls, from `tools` and `tool_choice`.
fn tool_use(app: &AppState, b: &ChatBody) -> Result<Option<ToolPlan>, ApiError> {
    let tools = b.tools.as_deref().unwrap_or_default();
    let bad = |param, msg: String| ApiError {
        param: Some(param),
        ..ApiError::invalid(msg)
    };
    for (i, t) in tools.iter().enumerate() {
        if !t["function"]["name"].is_string() {
            return Err(bad(
                "tools",
                format!("tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}"),
            ));
        }
    }
    // None: auto; Some(None): required; Some(Some(name)): that function.
    let forced: Option<Option<&str>> = match &b.tool_choice {
        None => None,
        Some(Value::String(s)) if s == "auto" => None,
        Some(Value::String(s)) if s == "none" => return Ok(None),
        Some(Value::String(s)) if s == "required" => Some(None),
        Some(v) if v["function"]["name"].is_string() => Some(v["function"]["name"].as_str()),
        Some(v) => {
            return Err(bad(
                "tool_choice",
                format!(
                    "tool_choice {v} is not \"auto\", \"none\", \"required\" or a named function"
                ),
            ))
        }
    };
    if tools.is_empty() {
        return match forced {
            Some(_) => Err(bad(
                "tool_choice",
                "tool_choice asks for a tool call but no tools are given".into(),
            )),
            None => Ok(None),
        };
    }
    if let Some(Some(name)) = forced {
        if !tools.iter().any(|t| t["function"]["name"] == name) {
            return Err(bad(
                "tool_choice",
                format!("tool_choice names {name:?}, which is not in tools"),
            ));
        }
    }
    let Some(parser) = app.tool_parser else {
        return Err(bad(
            "tools",
            "this model's tool-call syntax is unknown (neither Kimi-K2's nor DeepSeek's markers are in its tokenizer); start the server with --tool-call-parser".into(),
        ));
    };
    let calls_so_far = b
        .messages
        .iter()
        .filter_map(|m| m["tool_calls"].as_array())
        .map(Vec::len)
        .sum();
    let parallel = b.parallel_tool_calls.unwrap_or(true);
    let forced = match forced {
        Some(name) => Some(Forced {
            text: parser.forced_prefix(name, calls_so_far),
            grammar: parser
                .call_grammar(tools, name, parallel, &|t| {
                    app.engine.tokenizer.token_to_id(t)
                })
                .map_err(|e| bad("tools", e))?,
        }),
        None => None,
    };
    Ok(Some(ToolPlan {
        parser,
        parallel,
        forced,
    }))
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(
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

#[derive(Clone, Copy)]
enum Kind {
    Completion,
    /// A chat, its answer read for reasoning and tool calls as the request and model need.
    Chat(ChatRead),
}

pub async fn completions(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let result = async {
        let arm = pick_arm(&app, &headers)?;
        let b: CompletionBody = prepare(move || parse(body)).await?;
        let texts = match b.prompt {
            Prompt::Text(t) => vec![t],
            Prompt::Texts(v) => v,
            Prompt::Ids(ids) => {
                check_ids(&app, &ids)?;
                return run(app.clone(), arm, Kind::Completion, ids, None, b.common).await;
            }
            Prompt::IdLists(v) => {
                for ids in &v {
                    check_ids(&app, ids)?;
                }
                return run_prompts(app.clone(), arm, v, b.common).await;
            }
        };
        for t in &texts {
            check_prompt_bytes(&app.engine, t.len())?;
        }
        // Tokenizing a long prompt takes a while: off the async workers, below the model.
        let engine = app.engine.clone();
        let prompts = prepare(move || {
            texts
                .iter()
                .map(|t| {
                    engine
                        .encode(t)
                        .map_err(|e| ApiError::invalid(format!("{e:#}")))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        run_prompts(app.clone(), arm, prompts, b.common).await
    }
    .await;
    finish(&app, result)
}

/// A prompt given as token ids: each must be in the vocabulary.
fn check_ids(app: &AppState, ids: &[u32]) -> Result<(), ApiError> {
    let vocab = app.engine.model.config().vocab_size;
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(bad) => Err(ApiError {
            param: Some("prompt"),
            ..ApiError::invalid(format!(
                "token id {bad} in the prompt is out of range (vocab_size {vocab})"
            ))
        }),
        None => Ok(()),
    }
}

/// Most prompts one completions request may give (each is a sequence of the batch).
const MAX_PROMPTS: usize = 32;

/// Completions of several prompts in one request, as OpenAI answers them: one choice per
/// prompt (`index` its position), generated together in the running batch, usage summed.
async fn run_prompts(
    app: AppState,
    arm: usize,
    prompts: Vec<Vec<u32>>,
    common: Common,
) -> Result<Response, ApiError> {
    let bad = |m: String| ApiError {
        param: Some("prompt"),
        ..ApiError::invalid(m)
    };
    match prompts.len() {
        0 => return Err(bad("prompt must not be an empty list".into())),
        1 => {
            let ids = prompts.into_iter().next().unwrap_or_default();
            return run(app, arm, Kind::Completion, ids, None, common).await;
        }
        n if n > MAX_PROMPTS => {
            return Err(bad(format!(
                "at most {MAX_PROMPTS} prompts in one request; this one has {n}"
            )))
        }
        _ if common.stream.unwrap_or(false) => {
            return Err(bad(
                "streaming takes one prompt per request (send several requests to stream several)"
                    .into(),
            ))
        }
        _ => {}
    }
    let answers = prompts.into_iter().map(|ids| {
        let (app, common) = (app.clone(), common.clone());
        async move {
            match answer(app, arm, Kind::Completion, ids, None, common).await? {
                Answer::Whole(body) => Ok(body),
                Answer::Stream(_) => Err(ApiError::internal("a streamed answer in a batch")),
            }
        }
    });
    let answers = futures_util::future::try_join_all(answers).await?;
    let mut body = answers[0].clone();
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (i, a) in answers.iter().enumerate() {
        let mut c = a["choices"][0].clone();
        c["index"] = i.into();
        choices.push(c);
        prompt_tokens += a["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
        completion_tokens += a["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
    }
    body["choices"] = choices.into();
    body["usage"] = usage_json(prompt_tokens, completion_tokens);
    Ok(Json(body).into_response())
}

pub async fn chat_completions(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let result = async {
        let arm = pick_arm(&app, &headers)?;
        // Parsing, rendering and tokenizing a long prompt take a while: off the async
        // workers, below the model.
        let prepared = {
            let app = app.clone();
            prepare(move || prepare_chat(&app, parse(body)?)).await?
        };
        let (ids, read, forced, common) = prepared;
        run(app.clone(), arm, Kind::Chat(read), ids, forced, common).await
    }
    .await;
    finish(&app, result)
}

/// A chat request's prompt ids (template rendered, user text tokenized as text, a forced
/// call's start appended), how its answer is read, and the forced call.
pub(super) fn prepare_chat(
    app: &AppState,
    b: ChatBody,
) -> Result<(Vec<u32>, ChatRead, Option<Forced>, Common), ApiError> {
    check_messages(&b.messages)?;
    let tools = tool_use(app, &b)?;
    let t = app.engine.chat_template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "this model has no chat template (chat_template.jinja or tokenizer_config.json's chat_template)",
        )
    })?;
    let kwargs = b.chat_template_kwargs.clone().unwrap_or_default();
    let render = |messages: &[Value], tools: Option<&[Value]>| {
        t.render_chat(&crate::chat::ChatInput {
            messages,
            tools: tools.filter(|t| !t.is_empty()),
            add_generation_prompt: b.add_generation_prompt.unwrap_or(true),
            kwargs: &kwargs,
        })
        .map_err(|e| ApiError::invalid(format!("cannot apply the chat template: {e:#}")))
    };
    let engine = &app.engine;
    let forged = |v: &Value| crate::chat::any_user_text(v, &|s| engine.contains_special(s));
    let any_forged = b.messages.iter().any(forged) || b.tools.iter().flatten().any(forged);
    let (text, ids) = if any_forged {
        // Special-token text in the user's strings is text, never a control token: render
        // with the user's strings marked, and tokenize them apart.
        let marked =
            |v: &[Value]| -> Vec<Value> { v.iter().map(crate::chat::mark_user_text).collect() };
        let tools = b.tools.as_deref().map(marked);
        let rendered = render(&marked(&b.messages), tools.as_deref())?;
        check_prompt_bytes(engine, rendered.len())?;
        let segments = crate::chat::split_marked(&rendered);
        let text: String = segments.iter().map(|(s, _)| s.as_str()).collect();
        let ids = engine.encode_segments(&segments);
        (text, ids)
    } else {
        let text = render(&b.messages, b.tools.as_deref())?;
        check_prompt_bytes(engine, text.len())?;
        let ids = engine.encode(&text);
        (text, ids)
    };
    let mut ids = ids.map_err(|e| ApiError::invalid(format!("{e:#}")))?;
    // A template that writes thinking blocks marks a reasoning model.
    let mut reasoning = t
        .text
        .contains("</think>")
        .then(|| super::reasoning::ReasoningStream::prompt_opens_block(&text));
    let (read_tools, forced) = match tools {
        Some(t) => (Some((t.parser, t.parallel)), t.forced),
        None => (None, None),
    };
    if let Some(Forced { text: prefix, .. }) = &forced {
        // The call's start is written for the model, so the answer is the call: a thinking
        // block the prompt opened is closed first, and there is no thinking to read.
        let written = match reasoning {
            Some(true) => format!("</think>{prefix}"),
            _ => prefix.clone(),
        };
        reasoning = None;
        ids.extend(
            engine
                .tokenizer
                .encode_bare(&written)
                .map_err(|e| ApiError::invalid(format!("{e:#}")))?,
        );
    }
    let read = ChatRead {
        tools: read_tools,
        reasoning,
    };
    Ok((ids, read, forced, b.common))
}

/// A request naming a model must name this server's (404 otherwise, as OpenAI answers).
pub(super) fn check_model(app: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != app.model_name => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "model {m:?} does not exist; this server serves {:?}",
                app.model_name
            ),
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model"),
        }),
        _ => Ok(()),
    }
}

/// Runs request preparation on the low-priority pool (`prep`).
pub(super) async fn prepare<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    super::prep::run(f)
        .await
        .unwrap_or_else(|| Err(ApiError::internal("preparing the request failed")))
}

/// A prompt longer than the context holds even at the tokenizer's longest token is refused
/// before it is tokenized (a 7 MB prompt cost seconds of CPU to be told it was too long).
fn check_prompt_bytes(engine: &crate::engine::Engine, bytes: usize) -> Result<(), ApiError> {
    let limit = engine.max_prompt_bytes();
    if bytes > limit {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            param: Some("messages"),
            ..ApiError::invalid(format!(
                "the prompt is {bytes} bytes: more than this model's maximum context length of {} tokens can hold ({limit} bytes at most)",
                engine.model.config().max_position_embeddings
            ))
        });
    }
    Ok(())
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

/// Text written for the model at the end of the prompt (a forced tool call's start), read as
/// the beginning of its answer, and the grammar of what the model writes after it.
pub(super) struct Forced {
    text: String,
    /// The calls' arguments valid against the tools' schemas, and the section's end
    /// (llguidance Lark).
    grammar: String,
}

/// At most this many `logit_bias` entries (OpenAI's limit).
const MAX_LOGIT_BIAS: usize = 300;

/// The token biases a request asks for, checked: ids in the vocabulary, biases in [-100, 100].
fn logit_bias(c: &Common, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(map) = &c.logit_bias else {
        return Ok(Vec::new());
    };
    let bad = |m: String| ApiError {
        param: Some("logit_bias"),
        ..ApiError::invalid(m)
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(bad(format!(
            "logit_bias takes at most {MAX_LOGIT_BIAS} tokens"
        )));
    }
    let mut out = Vec::with_capacity(map.len());
    for (k, &v) in map {
        let id: u32 = k
            .parse()
            .map_err(|_| bad(format!("logit_bias key {k:?} is not a token id")))?;
        if id as usize >= vocab {
            return Err(bad(format!(
                "logit_bias token {id} is out of range (vocab_size {vocab})"
            )));
        }
        if !(-100.0..=100.0).contains(&v) {
            return Err(bad(format!(
                "logit_bias for token {id} is {v}, outside [-100, 100]"
            )));
        }
        out.push((id, v));
    }
    out.sort_unstable_by_key(|e| e.0);
    Ok(out)
}

/// The grammar `response_format` asks for (`None`: free text).
fn response_grammar(c: &Common) -> Result<Option<llguidance::api::TopLevelGrammar>, ApiError> {
    let Some(f) = &c.response_format else {
        return Ok(None);
    };
    let bad = |m: &str| ApiError {
        param: Some("response_format"),
        ..ApiError::invalid(m)
    };
    match f["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(crate::structured::json_schema(
            json!({"type": "object"}),
        ))),
        Some("json_schema") => {
            let schema = &f["json_schema"]["schema"];
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad(
                    "response_format json_schema needs {\"json_schema\": {\"name\", \"schema\": {...}}}",
                ));
            }
            Ok(Some(crate::structured::json_schema(schema.clone())))
        }
        _ => Err(bad(
            "response_format type must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

/// A generation's answer: a stream of server-sent events, or the whole response body.
enum Answer {
    Stream(Response),
    Whole(Value),
}

async fn run(
    app: AppState,
    arm: usize,
    kind: Kind,
    prompt_ids: Vec<u32>,
    forced: Option<Forced>,
    c: Common,
) -> Result<Response, ApiError> {
    Ok(match answer(app, arm, kind, prompt_ids, forced, c).await? {
        Answer::Stream(r) => r,
        Answer::Whole(body) => Json(body).into_response(),
    })
}

async fn answer(
    app: AppState,
    arm: usize,
    kind: Kind,
    prompt_ids: Vec<u32>,
    forced: Option<Forced>,
    c: Common,
) -> Result<Answer, ApiError> {
    let cfg = app.engine.model.config();
    check_model(&app, c.model.as_deref())?;
    if let Some(stop) = &c.stop {
        let stops = match stop {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v.as_slice(),
        };
        if stops.len() > MAX_STOPS || stops.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError {
                param: Some("stop"),
                ..ApiError::invalid(format!(
                    "stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_BYTES} bytes each"
                ))
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
        Kind::Chat(_) => limit.saturating_sub(prompt_ids.len()).max(1) as u64,
    };
    let max_tokens = c
        .max_completion_tokens
        .or(c.max_tokens)
        .unwrap_or(default_max) as usize;
    if max_tokens == 0 {
        return Err(ApiError {
            param: Some("max_tokens"),
            ..ApiError::invalid("max_tokens must be at least 1")
        });
    }
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
    let logprobs = requested_logprobs(kind, &c)?;
    let params = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_k: 0,
        top_p: c.top_p.unwrap_or(1.0),
        seed: c.seed.unwrap_or_else(next_id),
    };
    params
        .validate()
        .map_err(|e| ApiError::invalid(format!("{e:#}")))?;
    let bias = logit_bias(&c, cfg.vocab_size)?;
    let grammar = match &forced {
        Some(f) => Some(crate::structured::lark(f.grammar.clone())),
        None => response_grammar(&c)?,
    };
    let constraint = match grammar {
        None => None,
        Some(g) => {
            let engine = app.engine.clone();
            let param = if forced.is_some() {
                "tools"
            } else {
                "response_format"
            };
            let c = prepare(move || {
                engine
                    .grammars()
                    .and_then(|gs| gs.constraint(g))
                    .map_err(|e| ApiError {
                        param: Some(param),
                        ..ApiError::invalid(format!("cannot compile the {param} grammar: {e:#}"))
                    })
            })
            .await?;
            Some(c)
        }
    };
    let include_usage = c
        .stream_options
        .as_ref()
        .is_some_and(|o| o["include_usage"] == true);
    let forced = forced.map(|f| f.text);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let request = GenRequest {
        arm,
        prompt_ids,
        max_tokens,
        params,
        stop: c.stop.map(OneOrMany::into_vec).unwrap_or_default(),
        keep_special: match kind {
            Kind::Chat(read) => kept_tokens(&app, read),
            Kind::Completion => Vec::new(),
        },
        logprobs,
        logit_bias: bias,
        constraint,
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
        if matches!(kind, Kind::Chat(_)) {
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
        let head = StreamHead {
            id,
            created,
            model,
            include_usage,
        };
        let stream = async_stream(head, kind, forced, app.engine.clone(), rx);
        return Ok(Answer::Stream(
            Sse::new(stream)
                .keep_alive(KeepAlive::default())
                .into_response(),
        ));
    }
    let mut text = forced.unwrap_or_default();
    let mut token_logprobs = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Text(t) => text.push_str(&t),
            GenEvent::Logprobs(l) => token_logprobs.extend(l),
            GenEvent::Error(e) => return Err(ApiError::internal(e)),
            GenEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let usage = usage_json(prompt_tokens, completion_tokens);
                let lp = match logprobs {
                    Some(_) => logprobs_json(&app.engine, kind, &token_logprobs, &mut 0),
                    None => Value::Null,
                };
                let body = match kind {
                    Kind::Completion => {
                        json!({"id": id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish_reason}],
                        "usage": usage})
                    }
                    Kind::Chat(read) => {
                        let (reasoning, content, calls) =
                            super::answer::read_whole(read, &text, &id);
                        let mut message = json!({"role": "assistant",
                            "content": if content.is_empty() && !calls.is_empty() { Value::Null } else { content.into() }});
                        if read.reasoning.is_some() {
                            message["reasoning_content"] = if reasoning.is_empty() {
                                Value::Null
                            } else {
                                reasoning.into()
                            };
                        }
                        if !calls.is_empty() {
                            message["tool_calls"] =
                                calls.iter().map(tool_call_json).collect::<Vec<_>>().into();
                        }
                        let finish = chat_finish(finish_reason, calls.len());
                        json!({"id": id, "object": "chat.completion", "created": created, "model": model,
                        "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}],
                        "usage": usage})
                    }
                };
                return Ok(Answer::Whole(body));
            }
        }
    }
    Err(ApiError::status(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "generation was cancelled",
    ))
}

/// How many alternatives per token the request wants reported, if it wants log-probabilities:
/// completions' `logprobs` (0-5), chat's `logprobs: true` with `top_logprobs` (0-20).
fn requested_logprobs(kind: Kind, c: &Common) -> Result<Option<usize>, ApiError> {
    let bad = |msg: &str| ApiError {
        param: Some("logprobs"),
        ..ApiError::invalid(msg)
    };
    match (kind, &c.logprobs) {
        (Kind::Completion, None | Some(Value::Null)) => Ok(None),
        (Kind::Completion, Some(v)) => match v.as_u64() {
            Some(n) if n <= 5 => Ok(Some(n as usize)),
            _ => Err(bad("logprobs must be an integer from 0 to 5")),
        },
        (Kind::Chat(_), None | Some(Value::Null) | Some(Value::Bool(false))) => {
            match c.top_logprobs {
                None | Some(0) => Ok(None),
                Some(_) => Err(bad("top_logprobs needs logprobs: true")),
            }
        }
        (Kind::Chat(_), Some(Value::Bool(true))) => match c.top_logprobs.unwrap_or(0) {
            n @ 0..=20 => Ok(Some(n as usize)),
            _ => Err(bad("top_logprobs must be from 0 to 20")),
        },
        (Kind::Chat(_), Some(_)) => Err(bad("logprobs must be true or false")),
    }
}

/// OpenAI's `logprobs` object for `tokens`: chat's `{"content": [{token, logprob, bytes,
/// top_logprobs}]}`, or completions' `{tokens, token_logprobs, top_logprobs, text_offset}`
/// (`offset`: the text's length before these tokens, advanced past them). A token's text is
/// its own decoding (special tokens by name); `bytes` are that text's UTF-8.
fn logprobs_json(
    engine: &crate::engine::Engine,
    kind: Kind,
    tokens: &[crate::engine::TokenLogprob],
    offset: &mut usize,
) -> Value {
    let text = |id: u32| engine.tokenizer.decode(&[id], false).unwrap_or_default();
    match kind {
        Kind::Chat(_) => {
            let entry = |id: u32, lp: f32| {
                let t = text(id);
                json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
            };
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut e = entry(t.id, t.logprob);
                    e["top_logprobs"] = t.top.iter().map(|&(i, lp)| entry(i, lp)).collect();
                    e
                })
                .collect();
            json!({"content": content})
        }
        Kind::Completion => {
            let (mut toks, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
            for t in tokens {
                let s = text(t.id);
                offs.push(*offset);
                *offset += s.len();
                toks.push(s);
                lps.push(t.logprob);
                let top: serde_json::Map<String, Value> =
                    t.top.iter().map(|&(i, lp)| (text(i), json!(lp))).collect();
                tops.push(top);
            }
            json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
        }
    }
}

/// OpenAI's `usage` object.
fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens})
}

/// A chat's finish reason: `tool_calls` when it made calls, except that a call cut off by
/// `max_tokens` is still `length`, as OpenAI says it.
fn chat_finish(reason: &'static str, calls: usize) -> &'static str {
    if calls > 0 && reason != "length" {
        "tool_calls"
    } else {
        reason
    }
}

/// An OpenAI tool call object.
fn tool_call_json(c: &super::tools::ToolCall) -> Value {
    json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
}

/// What one streamed chunk carries.
enum Piece<'a> {
    Text(&'a str),
    Reasoning(&'a str),
    /// A call begins: index, id, name.
    CallBegin(usize, &'a str, &'a str),
    /// More of a call's arguments.
    CallArgs(usize, &'a str),
    Finish(&'a str),
}

fn chunk(
    id: &str,
    created: u64,
    model: &str,
    kind: Kind,
    piece: Piece<'_>,
    first: bool,
    logprobs: Value,
) -> Value {
    let finish = match piece {
        Piece::Finish(f) => Some(f),
        _ => None,
    };
    match kind {
        Kind::Completion => {
            let text = match piece {
                Piece::Text(t) => t,
                _ => "",
            };
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]})
        }
        Kind::Chat(_) => {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            match piece {
                Piece::Text(t) => {
                    delta.insert("content".into(), json!(t));
                }
                Piece::Reasoning(t) => {
                    delta.insert("reasoning_content".into(), json!(t));
                }
                // OpenAI's streamed call: a first chunk with its index, id, type, name and
                // empty arguments, then chunks with the index and pieces of the arguments.
                Piece::CallBegin(index, call_id, name) => {
                    delta.insert(
                        "tool_calls".into(),
                        json!([{"index": index, "id": call_id, "type": "function",
                                "function": {"name": name, "arguments": ""}}]),
                    );
                }
                Piece::CallArgs(index, args) => {
                    delta.insert(
                        "tool_calls".into(),
                        json!([{"index": index, "function": {"arguments": args}}]),
                    );
                }
                Piece::Finish(_) => {}
            }
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
        }
    }
}

/// What every chunk of a stream names.
struct StreamHead {
    id: String,
    created: u64,
    model: String,
    /// End with OpenAI's usage chunk (`stream_options.include_usage`).
    include_usage: bool,
}

/// `engine`: to name the tokens of requested log-probabilities, which ride on the next chunk
/// sent after their tokens.
fn async_stream(
    head: StreamHead,
    kind: Kind,
    forced: Option<String>,
    engine: Arc<crate::engine::Engine>,
    rx: mpsc::UnboundedReceiver<GenEvent>,
) -> impl futures_core::Stream<Item = Result<Event, Infallible>> {
    let StreamHead {
        id,
        created,
        model,
        include_usage,
    } = head;
    struct S {
        rx: mpsc::UnboundedReceiver<GenEvent>,
        first: bool,
        done: bool,
        /// Events ready to send, oldest first.
        ready: std::collections::VecDeque<Event>,
        reader: Option<super::answer::ChatReader>,
        /// What the forced start of a call produced (its announcement), sent first.
        early: Vec<super::answer::Out>,
        /// Log-probabilities not yet sent, and the completion text's length so far.
        logprobs: Vec<crate::engine::TokenLogprob>,
        offset: usize,
    }
    let mut early = Vec::new();
    let reader = match kind {
        Kind::Chat(read) => {
            let mut r = super::answer::ChatReader::new(read, &id);
            if let Some(f) = &forced {
                // A forced call's header announces the call before the model writes a token.
                early = r.push(f);
            }
            Some(r)
        }
        Kind::Completion => None,
    };
    let state = S {
        rx,
        first: true,
        done: false,
        ready: Default::default(),
        reader,
        early,
        logprobs: Vec::new(),
        offset: 0,
    };
    futures_util::stream::unfold(state, move |mut s| {
        let (id, model, engine) = (id.clone(), model.clone(), engine.clone());
        async move {
            loop {
                if let Some(ev) = s.ready.pop_front() {
                    return Some((Ok(ev), s));
                }
                if s.done {
                    return None;
                }
                let send = |s: &mut S, piece: Piece<'_>| {
                    let lp = if s.logprobs.is_empty() {
                        Value::Null
                    } else {
                        let l = std::mem::take(&mut s.logprobs);
                        logprobs_json(&engine, kind, &l, &mut s.offset)
                    };
                    let c = chunk(&id, created, &model, kind, piece, s.first, lp);
                    s.first = false;
                    s.ready.push_back(Event::default().data(c.to_string()));
                };
                let outs = |s: &mut S, outs: Vec<super::answer::Out>| {
                    for o in outs {
                        match o {
                            super::answer::Out::Content(t) => send(s, Piece::Text(&t)),
                            super::answer::Out::Reasoning(t) => send(s, Piece::Reasoning(&t)),
                            super::answer::Out::CallBegin(i, call_id, name) => {
                                send(s, Piece::CallBegin(i, &call_id, &name))
                            }
                            super::answer::Out::CallArgs(i, a) => send(s, Piece::CallArgs(i, &a)),
                            // Streamed already as its begin and arguments.
                            super::answer::Out::Call(..) => {}
                        }
                    }
                };
                if !s.early.is_empty() {
                    let early = std::mem::take(&mut s.early);
                    outs(&mut s, early);
                    continue;
                }
                match s.rx.recv().await {
                    Some(GenEvent::Logprobs(l)) => s.logprobs.extend(l),
                    Some(GenEvent::Text(t)) => match s.reader.as_mut() {
                        Some(r) => {
                            let o = r.push(&t);
                            outs(&mut s, o);
                        }
                        None => send(&mut s, Piece::Text(&t)),
                    },
                    Some(GenEvent::Done {
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                    }) => {
                        let mut finish = finish_reason;
                        if let Some(r) = s.reader.as_mut() {
                            let o = r.finish();
                            finish = chat_finish(finish_reason, r.calls());
                            outs(&mut s, o);
                        }
                        send(&mut s, Piece::Finish(finish));
                        if include_usage {
                            // OpenAI's shape: a last chunk with no choices and the usage.
                            let object = match kind {
                                Kind::Completion => "text_completion",
                                Kind::Chat(_) => "chat.completion.chunk",
                            };
                            let usage = json!({"id": id, "object": object, "created": created,
                                "model": model, "choices": [],
                                "usage": usage_json(prompt_tokens, completion_tokens)});
                            s.ready.push_back(Event::default().data(usage.to_string()));
                        }
                        s.ready.push_back(Event::default().data("[DONE]"));
                        s.done = true;
                    }
                    Some(GenEvent::Error(e)) => {
                        s.ready.push_back(Event::default().data(json!({"error": {"message": e, "type": "server_error", "param": null, "code": null}}).to_string()));
                        s.ready.push_back(Event::default().data("[DONE]"));
                        s.done = true;
                    }
                    None => return None,
                }
            }
        }
    })
}

/// Special tokens a chat's text must keep: the tool parser's markers, and the thinking tags
/// where the tokenizer makes them special tokens (Kimi-K2-Thinking).
fn kept_tokens(app: &AppState, read: ChatRead) -> Vec<u32> {
    let tok = &app.engine.tokenizer;
    let mut keep = read
        .tools
        .map(|(p, _)| p.marker_ids(tok))
        .unwrap_or_default();
    if read.reasoning.is_some() {
        keep.extend(
            ["<think>", "</think>"]
                .iter()
                .filter_map(|t| tok.token_to_id(t)),
        );
    }
    keep
}

pub async fn models(State(app): State<AppState>) -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": app.model_name, "object": "model", "created": 0, "owned_by": "moehost"}]}),
    )
}
