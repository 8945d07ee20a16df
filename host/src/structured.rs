//! Structured output: grammars (JSON schemas, Lark) enforced token by token with llguidance,
//! so even a small model's answer parses and validates.
//!
//! Owns: the tokenizer as llguidance sees it (every id's bytes, special tokens marked), built
//! once per engine on first use; a per-sequence [`Constraint`] that masks the logits before
//! sampling and follows the sampled token. Does not own: which grammar a request asks for
//! (`server::openai` builds it from `response_format` and `tool_choice`), or sampling.

use anyhow::{anyhow, bail, Context, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use std::path::Path;
use std::sync::Arc;

use crate::tokenizer::Tokenizer;

/// Compiles grammars against one model's vocabulary.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// The vocabulary of `tokenizer` (a Hugging Face one read from the folder's
    /// `tokenizer.json`, so byte-level and metaspace tokens map to their true bytes) over
    /// `vocab_size` logits; ids past the tokenizer's are never allowed.
    pub fn new(dir: &Path, tokenizer: &Tokenizer, vocab_size: usize, eos: u32) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let mut words = if let Some(words) = tokenizer.tiktoken_bytes() {
            words
        } else {
            let text = std::fs::read_to_string(&json)
                .with_context(|| format!("cannot read {}", json.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", json.display()))?;
            llguidance::token_bytes_from_tokenizer_json(&value)
                .map_err(|e| anyhow!("cannot read the vocabulary of {}: {e}", json.display()))?
        };
        words.resize(vocab_size.max(words.len()), Vec::new());
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| anyhow!("cannot prepare structured output: {e}"))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A constraint for one sequence; an invalid grammar or schema is an error naming why.
    pub fn constraint(&self, grammar: TopLevelGrammar) -> Result<Constraint> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| anyhow!("{e}"))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            bail!("{e}");
        }
        Ok(Constraint { matcher })
    }
}

/// A grammar being followed by one sequence.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Sets the logits of every token the grammar does not allow next to -inf (only EOS once
    /// the grammar is complete).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| anyhow!("structured output: {e}"))?;
        let mut any = false;
        for (i, l) in logits.iter_mut().enumerate() {
            if allowed.is_allowed(i as u32) {
                any = true;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if !any {
            bail!("structured output: the grammar allows no token here");
        }
        Ok(())
    }

    /// Follows the sampled token (once the grammar is complete, that is end-of-sequence, which
    /// the stopped matcher need not see).
    pub fn advance(&mut self, token: u32) -> Result<()> {
        if self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| anyhow!("structured output: {e}"))
    }
}

/// A grammar from a JSON schema (`{"type": "object"}` for any JSON object), its JSON written
/// as [`json_layout`] says.
pub fn json_schema(schema: serde_json::Value) -> TopLevelGrammar {
    TopLevelGrammar::from_json_schema(json_layout(schema))
}

/// Sets how JSON may be laid out, unless the schema says itself (llguidance's `x-guidance`):
/// at most one space between tokens, no line breaks. With any whitespace allowed, a small
/// model fills its answer with newlines and tabs between two keys until `max_tokens` cuts it;
/// one space still allows both `{"a":1}` and `{"a": 1, "b": 2}`.
pub fn json_layout(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_pattern": "[\\x20]"}));
    }
    schema
}

/// A grammar in llguidance's Lark dialect (`%json {...}` inlines a schema, `<[ID]>` is a
/// special token by id).
pub fn lark(source: String) -> TopLevelGrammar {
    TopLevelGrammar::from_lark(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_masks_everything_but_its_json() {
        let dir = crate::engine::bundled_model_dir();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let n = tok.vocab_size();
        let eos = tok.token_to_id("<|eos|>").unwrap_or(0);
        let g = Grammars::new(&dir, &tok, n, eos).unwrap();
        let mut c = g
            .constraint(json_schema(serde_json::json!({
                "type": "object", "properties": {"a": {"type": "integer"}},
                "required": ["a"], "additionalProperties": false
            })))
            .unwrap();
        // Greedy on flat logits: the lowest allowed id each step, until only EOS is left.
        let mut ids = Vec::new();
        for _ in 0..64 {
            let mut logits = vec![0.0f32; n];
            c.mask(&mut logits).unwrap();
            let next = logits.iter().position(|l| l.is_finite()).unwrap() as u32;
            if next == eos {
                break;
            }
            c.advance(next).unwrap();
            ids.push(next);
        }
        let text = tok.decode(&ids, false).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        // An integer (JSON's grammar allows "-0", which serde_json reads as a float).
        assert!(v["a"].as_f64().is_some_and(|a| a.fract() == 0.0), "{text}");
        assert!(g
            .constraint(json_schema(serde_json::json!({"type": 7})))
            .is_err());
    }
}
