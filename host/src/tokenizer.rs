//! Text <-> token ids for a model folder as published: `tokenizer.json` (Hugging Face
//! `tokenizers`: DeepSeek-V3/R1, the bundled tiny-k2), or Kimi-K2's `tiktoken.model` with
//! `tokenizer_config.json` (tiktoken's byte-pair encoding, see [`Tiktoken`]).
//!
//! Owns: finding and checking the tokenizer files, encode and decode, the BOS rule (a prompt
//! that already starts with the BOS token never gets a second one). Does not own: chat
//! templates (the server), generation or stop rules (`engine`).

use anyhow::{bail, ensure, Context, Result};
use base64::Engine as _;
use std::collections::HashMap;
use std::path::Path;

/// A model folder's tokenizer.
pub enum Tokenizer {
    /// `tokenizer.json`: its post-processor decides what is added to a prompt. `plain` is the
    /// same tokenizer reading special-token text as ordinary text.
    HuggingFace {
        tok: Box<tokenizers::Tokenizer>,
        plain: Box<tokenizers::Tokenizer>,
    },
    /// `tiktoken.model`: `add_bos` from `tokenizer_config.json`'s `add_bos_token`.
    Tiktoken { bpe: Box<Tiktoken>, add_bos: bool },
}

/// Split pattern of Kimi-K2's tokenizer (`tokenization_kimi.py`'s `pat_str`), the default
/// for a `tiktoken.model` folder. `&&` is a class intersection.
pub const KIMI_PATTERN: &str = concat!(
    r"[\p{Han}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"|\s*[\r\n]+",
    r"|\s+(?!\S)",
    r"|\s+",
);

/// Special ids a Kimi `tiktoken.model` folder reserves after its ranks (`num_reserved_special_tokens`).
const RESERVED_SPECIALS: u32 = 256;

impl Tokenizer {
    /// The folder's tokenizer: `tokenizer.json` if present, else `tiktoken.model` (with
    /// `tokenizer_config.json` naming its special tokens).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let hf = dir.join("tokenizer.json");
        if hf.exists() {
            let tok = tokenizers::Tokenizer::from_file(&hf)
                .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", hf.display()))?;
            let mut plain = tok.clone();
            plain.set_encode_special_tokens(true);
            return Ok(Self::HuggingFace {
                tok: Box::new(tok),
                plain: Box::new(plain),
            });
        }
        let tt = dir.join("tiktoken.model");
        if tt.exists() {
            let config = read_tokenizer_config(dir)?;
            let bpe = Tiktoken::from_files(&tt, &config, KIMI_PATTERN)?;
            let add_bos = config
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            return Ok(Self::Tiktoken {
                bpe: Box::new(bpe),
                add_bos,
            });
        }
        bail!(
            "{} has no tokenizer: neither tokenizer.json nor tiktoken.model",
            dir.display()
        )
    }

    /// Token ids of `text`. Special-token text in it (`<|im_end|>`) maps to its id. The
    /// tokenizer's own BOS rule applies once: if the text already starts with the BOS token,
    /// no second one is added.
    pub fn encode(&self, text: &str, bos: Option<u32>) -> Result<Vec<u32>> {
        match self {
            Self::HuggingFace { tok, .. } => {
                let mut ids = hf_ids(tok, text, true)?;
                if let Some(b) = bos {
                    let text_starts_with_bos = tok
                        .id_to_token(b)
                        .is_some_and(|t| text.trim_start().starts_with(&t));
                    let adds_bos = || {
                        tok.encode("", true)
                            .is_ok_and(|e| e.get_ids().first() == Some(&b))
                    };
                    if text_starts_with_bos
                        && ids.len() >= 2
                        && ids[0] == b
                        && ids[1] == b
                        && adds_bos()
                    {
                        // The post-processor prepended BOS to a text that began with it.
                        ids.remove(0);
                    }
                }
                Ok(ids)
            }
            Self::Tiktoken { bpe, add_bos } => {
                let mut ids = Vec::new();
                if let Some(b) = bos.filter(|_| *add_bos) {
                    ids.push(b);
                }
                let body = bpe.encode(text);
                if !ids.is_empty() && body.first() == ids.first() {
                    ids.clear();
                }
                ids.extend(body);
                Ok(ids)
            }
        }
    }

    /// Text of `ids`; special tokens are left out when `skip_special`. Bytes that are not
    /// UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match self {
            Self::HuggingFace { tok, .. } => tok
                .decode(ids, skip_special)
                .map_err(|e| anyhow::anyhow!("cannot decode tokens: {e}")),
            Self::Tiktoken { bpe, .. } => bpe.decode(ids, skip_special),
        }
    }

    /// Token ids of `text` with nothing added and special-token text read as ordinary text
    /// (`<|im_end|>` in a user's message is characters, not the control token).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::HuggingFace { plain, .. } => hf_ids(plain, text, false),
            Self::Tiktoken { bpe, .. } => {
                let mut out = Vec::new();
                bpe.encode_ordinary(text, &mut out);
                Ok(out)
            }
        }
    }

    /// Token ids of `text` with special-token text recognised but nothing added (no BOS, no
    /// post-processor).
    pub fn encode_bare(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::HuggingFace { tok, .. } => hf_ids(tok, text, false),
            Self::Tiktoken { bpe, .. } => Ok(bpe.encode(text)),
        }
    }

    /// The text of every special token (control tokens a user's text must not forge).
    pub fn special_tokens(&self) -> Vec<String> {
        match self {
            Self::HuggingFace { tok, .. } => tok
                .get_added_tokens_decoder()
                .into_values()
                .filter(|t| t.special)
                .map(|t| t.content)
                .collect(),
            Self::Tiktoken { bpe, .. } => bpe.specials.keys().cloned().collect(),
        }
    }

    /// [`Tokenizer::decode`] leaving special tokens out except those in `keep`, which are
    /// written as their text (a tool-call parser's markers). Special tokens never share bytes
    /// with their neighbours, so the rest decodes as it would alone.
    pub fn decode_keeping(&self, ids: &[u32], keep: &[u32]) -> Result<String> {
        if keep.is_empty() {
            return self.decode(ids, true);
        }
        let mut out = String::new();
        let mut start = 0;
        for (i, id) in ids.iter().enumerate() {
            if keep.contains(id) {
                out.push_str(&self.decode(&ids[start..i], true)?);
                out.push_str(&self.decode(&[*id], false)?);
                start = i + 1;
            }
        }
        out.push_str(&self.decode(&ids[start..], true)?);
        Ok(out)
    }

    /// The id of a token written as text (a special token's name, or a plain token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Self::HuggingFace { tok, .. } => tok.token_to_id(token),
            Self::Tiktoken { bpe, .. } => bpe
                .specials
                .get(token)
                .or_else(|| bpe.ranks.get(token.as_bytes()))
                .copied(),
        }
    }

    /// Each id's bytes for grammar-constrained decoding, for a `tiktoken.model` tokenizer: a
    /// special token is its name after the 0xFF marker llguidance reads as "special". `None`
    /// for a Hugging Face tokenizer, whose vocabulary strings are encoded (byte-level,
    /// metaspace): llguidance reads those from `tokenizer.json` itself.
    pub fn tiktoken_bytes(&self) -> Option<Vec<Vec<u8>>> {
        let Self::Tiktoken { bpe, .. } = self else {
            return None;
        };
        let mut words = vec![Vec::new(); self.vocab_size()];
        for (id, bytes) in bpe.tokens.iter().enumerate() {
            words[id] = bytes.clone();
        }
        for (id, name) in &bpe.special_names {
            let mut b = vec![0xFF];
            b.extend_from_slice(name.as_bytes());
            words[*id as usize] = b;
        }
        Some(words)
    }

    /// An upper bound on the bytes of text one token stands for (a vocabulary string's own
    /// length: byte-level and metaspace strings are never shorter than their bytes).
    pub fn max_token_bytes(&self) -> usize {
        match self {
            Self::HuggingFace { tok, .. } => tok
                .get_vocab(true)
                .keys()
                .map(String::len)
                .max()
                .unwrap_or(1),
            Self::Tiktoken { bpe, .. } => bpe
                .tokens
                .iter()
                .map(Vec::len)
                .chain(bpe.specials.keys().map(String::len))
                .max()
                .unwrap_or(1),
        }
    }

    /// Every id the tokenizer can produce is below this.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::HuggingFace { tok, .. } => tok.get_vocab_size(true),
            Self::Tiktoken { bpe, .. } => bpe.vocab_size(),
        }
    }
}

/// A Hugging Face tokenizer's ids for `text`, with its post-processor when `add_special`.
fn hf_ids(tok: &tokenizers::Tokenizer, text: &str, add_special: bool) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, add_special)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
        .get_ids()
        .to_vec())
}

fn read_tokenizer_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(serde_json::Value::Null);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// tiktoken's byte-pair encoding: the text is cut at special tokens, each stretch between
/// them is split by the pattern, and each piece that is not itself a token is merged from
/// single bytes, always joining the adjacent pair whose joined bytes have the lowest rank
/// (the leftmost such pair on equal ranks), until no adjacent pair is a token.
pub struct Tiktoken {
    ranks: HashMap<Vec<u8>, u32>,
    /// Bytes of each rank's token, by id.
    tokens: Vec<Vec<u8>>,
    specials: HashMap<String, u32>,
    special_names: HashMap<u32, String>,
    pattern: fancy_regex::Regex,
    /// Alternation of the special tokens, longest first; `None` without specials.
    special_pattern: Option<fancy_regex::Regex>,
}

impl Tiktoken {
    /// `tiktoken.model` (`base64(token) rank` per line, ranks 0..n contiguous) and the special
    /// tokens: ids n..n+256, named by `tokenizer_config.json`'s `added_tokens_decoder`, an
    /// unnamed one being `<|reserved_token_{id}|>`.
    pub fn from_files(model: &Path, config: &serde_json::Value, pattern: &str) -> Result<Self> {
        let text = std::fs::read_to_string(model)
            .with_context(|| format!("cannot read {}", model.display()))?;
        let ranks = parse_ranks(&text).with_context(|| format!("{}", model.display()))?;
        let n = ranks.len() as u32;
        let mut specials: HashMap<String, u32> = HashMap::new();
        if let Some(added) = config.get("added_tokens_decoder") {
            let added = added
                .as_object()
                .context("tokenizer_config.json: added_tokens_decoder is not an object")?;
            for (id, entry) in added {
                let id: u32 = id.parse().with_context(|| {
                    format!("tokenizer_config.json: added_tokens_decoder key {id:?} is not an id")
                })?;
                let content = entry
                    .get("content")
                    .and_then(|c| c.as_str())
                    .with_context(|| {
                        format!("tokenizer_config.json: added token {id} has no content")
                    })?;
                ensure!(
                    (n..n + RESERVED_SPECIALS).contains(&id),
                    "tokenizer_config.json: added token {content:?} has id {id}, outside the \
                     special ids {n}..{} that follow tiktoken.model's {n} ranks",
                    n + RESERVED_SPECIALS
                );
                specials.insert(content.to_owned(), id);
            }
        }
        let named: std::collections::HashSet<u32> = specials.values().copied().collect();
        for id in n..n + RESERVED_SPECIALS {
            if !named.contains(&id) {
                specials.insert(format!("<|reserved_token_{id}|>"), id);
            }
        }
        Self::new(ranks, specials, pattern)
    }

    /// From ranks and special tokens.
    pub fn new(
        ranks: HashMap<Vec<u8>, u32>,
        specials: HashMap<String, u32>,
        pattern: &str,
    ) -> Result<Self> {
        let mut tokens = vec![Vec::new(); ranks.len()];
        for (bytes, &rank) in &ranks {
            ensure!(
                (rank as usize) < tokens.len() && tokens[rank as usize].is_empty(),
                "token ranks are not 0..{} without gaps or repeats",
                ranks.len()
            );
            tokens[rank as usize] = bytes.clone();
        }
        for b in 0..=255u8 {
            ensure!(
                ranks.contains_key(&[b][..]),
                "byte {b:#04x} is not a token: some texts could not be encoded"
            );
        }
        let pattern = fancy_regex::Regex::new(pattern)
            .map_err(|e| anyhow::anyhow!("the tokenizer's split pattern does not compile: {e}"))?;
        let mut names: Vec<&String> = specials.keys().collect();
        names.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        let special_pattern = if names.is_empty() {
            None
        } else {
            let alt: Vec<String> = names
                .iter()
                .map(|s| fancy_regex::escape(s).into())
                .collect();
            Some(fancy_regex::Regex::new(&alt.join("|")).context("special tokens pattern")?)
        };
        let special_names = specials.iter().map(|(s, &id)| (id, s.clone())).collect();
        Ok(Self {
            ranks,
            tokens,
            specials,
            special_names,
            pattern,
            special_pattern,
        })
    }

    pub fn vocab_size(&self) -> usize {
        let top = self
            .special_names
            .keys()
            .max()
            .map_or(0, |&m| m as usize + 1);
        self.tokens.len().max(top)
    }

    /// tiktoken's `encode(text, allowed_special="all")`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut start = 0;
        while start <= text.len() {
            let special = self.special_pattern.as_ref().and_then(|re| {
                re.find_from_pos(text, start)
                    .ok()
                    .flatten()
                    .map(|m| (m.start(), m.end()))
            });
            let end = special.map_or(text.len(), |(s, _)| s);
            self.encode_ordinary(&text[start..end], &mut out);
            match special {
                Some((s, e)) => {
                    out.push(self.specials[&text[s..e]]);
                    start = e;
                }
                None => break,
            }
        }
        out
    }

    /// Text without special tokens: split by the pattern, each piece byte-pair encoded.
    fn encode_ordinary(&self, text: &str, out: &mut Vec<u32>) {
        let mut pos = 0;
        while pos < text.len() {
            // The pattern matches every non-empty text (its last branch is `\s+`, and every other
            // character falls in one of the others); a failure here would be a regex error.
            let Ok(Some(m)) = self.pattern.find_from_pos(text, pos) else {
                self.merge(&text.as_bytes()[pos..], out);
                return;
            };
            if m.end() == m.start() {
                // An empty match: step one character to avoid looping.
                let c = text[pos..].chars().next().map_or(1, char::len_utf8);
                self.merge(&text.as_bytes()[pos..pos + c], out);
                pos += c;
                continue;
            }
            if m.start() > pos {
                self.merge(&text.as_bytes()[pos..m.start()], out);
            }
            self.merge(m.as_str().as_bytes(), out);
            pos = m.end();
        }
    }

    /// Byte-pair merges of one piece.
    fn merge(&self, piece: &[u8], out: &mut Vec<u32>) {
        if let Some(&id) = self.ranks.get(piece) {
            out.push(id);
            return;
        }
        // Boundaries of the current parts: part i is piece[bounds[i]..bounds[i + 1]].
        let mut bounds: Vec<usize> = (0..=piece.len()).collect();
        let rank_of = |bounds: &[usize], i: usize| -> u32 {
            if i + 2 < bounds.len() {
                self.ranks
                    .get(&piece[bounds[i]..bounds[i + 2]])
                    .copied()
                    .unwrap_or(u32::MAX)
            } else {
                u32::MAX
            }
        };
        // pair[i]: rank of joining part i with part i + 1.
        let mut pair: Vec<u32> = (0..bounds.len() - 1).map(|i| rank_of(&bounds, i)).collect();
        loop {
            let mut best = (u32::MAX, 0);
            for (i, &r) in pair.iter().enumerate() {
                if r < best.0 {
                    best = (r, i);
                }
            }
            if best.0 == u32::MAX {
                break;
            }
            let i = best.1;
            bounds.remove(i + 1);
            pair.remove(i + 1);
            pair[i] = rank_of(&bounds, i);
            if i > 0 {
                pair[i - 1] = rank_of(&bounds, i - 1);
            }
        }
        out.extend(bounds.windows(2).map(|w| self.ranks[&piece[w[0]..w[1]]]));
    }

    /// tiktoken's `decode` (invalid UTF-8 replaced); special tokens left out when
    /// `skip_special`. An id the tokenizer does not have (a model's vocabulary may be larger
    /// than its tokenizer's) decodes to nothing, as Hugging Face tokenizers do.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            if let Some(t) = self.tokens.get(id as usize) {
                bytes.extend_from_slice(t);
            } else if let Some(name) = self.special_names.get(&id) {
                if !skip_special {
                    bytes.extend_from_slice(name.as_bytes());
                }
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// `base64(token) rank` lines.
fn parse_ranks(text: &str) -> Result<HashMap<Vec<u8>, u32>> {
    let mut ranks = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (token, rank) = line
            .split_once(' ')
            .with_context(|| format!("line {}: expected `base64 rank`", n + 1))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(token)
            .with_context(|| format!("line {}: {token:?} is not base64", n + 1))?;
        let rank: u32 = rank
            .trim()
            .parse()
            .with_context(|| format!("line {}: rank {rank:?} is not a number", n + 1))?;
        ensure!(
            ranks.insert(bytes, rank).is_none(),
            "line {}: token {token} appears twice",
            n + 1
        );
    }
    ensure!(!ranks.is_empty(), "no tokens");
    Ok(ranks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn byte_ranks(extra: &[&[u8]]) -> HashMap<Vec<u8>, u32> {
        let mut r: HashMap<Vec<u8>, u32> = (0..=255u8).map(|b| (vec![b], b as u32)).collect();
        for (i, t) in extra.iter().enumerate() {
            r.insert(t.to_vec(), 256 + i as u32);
        }
        r
    }

    #[test]
    fn merges_lowest_rank_first_and_leftmost_on_ties() {
        // "ab" (256) merges before "bc" (257); then "abc" is not a token: [ab, c].
        let t = Tiktoken::new(
            byte_ranks(&[b"ab", b"bc", b"abcd"]),
            HashMap::new(),
            r"\S+|\s+",
        )
        .unwrap();
        assert_eq!(t.encode("abc"), vec![256, b'c' as u32]);
        // "abcd" is a token itself.
        assert_eq!(t.encode("abcd"), vec![258]);
        assert_eq!(t.decode(&t.encode("abc abcd"), true).unwrap(), "abc abcd");
    }

    #[test]
    fn special_text_maps_to_its_id_and_decodes_when_asked() {
        let mut sp = HashMap::new();
        sp.insert("<|im_end|>".to_string(), 300);
        let t = Tiktoken::new(byte_ranks(&[]), sp, r"\S+|\s+").unwrap();
        assert_eq!(t.encode("a<|im_end|>"), vec![b'a' as u32, 300]);
        assert_eq!(t.decode(&[b'a' as u32, 300], true).unwrap(), "a");
        assert_eq!(t.decode(&[b'a' as u32, 300], false).unwrap(), "a<|im_end|>");
        // An id beyond the tokenizer (a model vocabulary can be larger) shows as nothing.
        assert_eq!(t.decode(&[b'a' as u32, 301], false).unwrap(), "a");
    }

    #[test]
    fn kimi_pattern_compiles() {
        fancy_regex::Regex::new(KIMI_PATTERN).unwrap();
    }
}
