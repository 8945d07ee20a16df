//! vLLM's `POST /tokenize` and `POST /detokenize`, so clients can count and inspect tokens
//! exactly as generation sees them.
//!
//! `/tokenize` takes `{"prompt": TEXT, "add_special_tokens"?: true}` (the completions
//! endpoint's encoding) or a chat request `{"messages", "tools"?, "add_generation_prompt"?: true,
//! "chat_template_kwargs"?}` (the chat endpoint's rendering and encoding, user text kept as
//! text), with `"return_token_strs"?: false`; it answers `{"count", "max_model_len", "tokens",
//! "token_strs"}`. `/detokenize` takes `{"tokens": [...]}` and answers `{"prompt": TEXT}`
//! (special tokens written out).

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::openai::{check_model, parse, prepare, prepare_chat, ApiError, ChatBody};
use super::AppState;

pub async fn tokenize(
    State(app): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let result = async {
        let v: Value = prepare(move || parse(body)).await?;
        check_model(&app, v.get("model").and_then(Value::as_str))?;
        let token_strs = v["return_token_strs"].as_bool().unwrap_or(false);
        let engine = app.engine.clone();
        let ids = if v.get("messages").is_some() {
            let chat: ChatBody = serde_json::from_value(v)
                .map_err(|e| ApiError::invalid(format!("invalid chat request: {e}")))?;
            let app = app.clone();
            prepare(move || prepare_chat(&app, chat).map(|p| p.0)).await?
        } else {
            let Some(prompt) = v["prompt"].as_str().map(str::to_owned) else {
                return Err(ApiError::invalid(
                    "tokenize takes {\"prompt\": text} or {\"messages\": [...]}",
                ));
            };
            let special = v["add_special_tokens"].as_bool().unwrap_or(true);
            if prompt.len() > engine.max_prompt_bytes() {
                return Err(ApiError {
                    param: Some("prompt"),
                    ..ApiError::invalid(format!(
                        "the prompt is {} bytes, more than this model's context can hold ({} bytes at most)",
                        prompt.len(),
                        engine.max_prompt_bytes()
                    ))
                });
            }
            let engine = engine.clone();
            prepare(move || {
                if special {
                    engine.encode(&prompt)
                } else {
                    engine.tokenizer.encode_bare(&prompt)
                }
                .map_err(|e| ApiError::invalid(format!("{e:#}")))
            })
            .await?
        };
        let strs = if token_strs {
            let s: Result<Vec<String>, _> = ids
                .iter()
                .map(|&id| engine.tokenizer.decode(&[id], false))
                .collect();
            Value::from(s.map_err(|e| ApiError::internal(e.to_string()))?)
        } else {
            Value::Null
        };
        Ok(Json(json!({
            "count": ids.len(),
            "max_model_len": engine.model.config().max_position_embeddings,
            "tokens": ids,
            "token_strs": strs,
        }))
        .into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

pub async fn detokenize(
    State(app): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let result = async {
        let v: Value = parse(body)?;
        check_model(&app, v.get("model").and_then(Value::as_str))?;
        let tokens: Vec<u32> =
            serde_json::from_value(v["tokens"].clone()).map_err(|_| ApiError {
                param: Some("tokens"),
                ..ApiError::invalid("detokenize takes {\"tokens\": [token ids]}")
            })?;
        let vocab = app.engine.model.config().vocab_size;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError {
                param: Some("tokens"),
                ..ApiError::invalid(format!(
                    "token id {bad} is out of range (vocab_size {vocab})"
                ))
            });
        }
        let text = app
            .engine
            .tokenizer
            .decode(&tokens, false)
            .map_err(|e| ApiError::invalid(format!("{e:#}")))?;
        Ok(Json(json!({"prompt": text})).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
