//! Compression: measure a model on calibration text (`profile`), cut it down to fewer layers
//! and experts as a valid checkpoint (`convert`), and measure what that cost (`eval`).
//!
//! Owns: the calibration statistics, the layer/expert choice, the streaming checkpoint writer,
//! perplexity. Does not own: the forward pass (`deepseek_v3`) or reading checkpoints
//! (`checkpoint`).

pub mod convert;
pub mod eval;
pub mod profile;

use anyhow::Result;

use crate::engine::Engine;

/// The text's tokens cut into windows of at most `window` tokens, each starting with the
/// model's BOS token (when it has one), as the model was trained (`<|bos|> text`); at most
/// `max_tokens` tokens in all.
pub fn windows(
    engine: &Engine,
    text: &str,
    window: usize,
    max_tokens: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    anyhow::ensure!(window >= 2, "the window must hold at least 2 tokens");
    let cfg = engine.model.config();
    let window = window.min(cfg.max_position_embeddings);
    let mut ids = engine.encode(text)?;
    anyhow::ensure!(!ids.is_empty(), "the text encodes to no tokens");
    if let Some(m) = max_tokens {
        ids.truncate(m);
    }
    let bos = cfg.bos_token_id;
    let body = window - usize::from(bos.is_some());
    Ok(ids
        .chunks(body)
        .map(|c| bos.into_iter().chain(c.iter().copied()).collect())
        .collect())
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{eta}})"
        ))
        .expect("valid template"),
    );
    bar
}
