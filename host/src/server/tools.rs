//! Tool calls in a model's output, as each model family writes them, turned into OpenAI's
//! `tool_calls` (whole, or streamed as `delta.tool_calls` chunks). The parsers and their names
//! are vLLM's (`--tool-call-parser kimi_k2 | deepseek_v3 | deepseek_v31`):
//!
//! - `kimi_k2`: `<|tool_calls_section_begin|>` then per call `<|tool_call_begin|>functions.NAME:IDX
//!   <|tool_call_argument_begin|>ARGS<|tool_call_end|>`, then `<|tool_calls_section_end|>`;
//!   the call id is `functions.NAME:IDX`, as Kimi's template writes it back.
//! - `deepseek_v3` (V3, R1): `<｜tool▁calls▁begin｜>` then per call `<｜tool▁call▁begin｜>function
//!   <｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>`, then `<｜tool▁calls▁end｜>`.
//! - `deepseek_v31` (V3.1): the same markers, per call `NAME<｜tool▁sep｜>ARGS`.
//!
//! Owns: finding calls in text (which must keep its special tokens) and splitting it into
//! content and calls. Does not own: the HTTP shapes (`openai`), rendering tools into the prompt
//! (the chat template).

use crate::tokenizer::Tokenizer;

/// A model family's tool-call syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolParser {
    KimiK2,
    DeepSeekV3,
    DeepSeekV31,
}

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as the model wrote them (a JSON object's text).
    pub arguments: String,
}

/// What a piece of output becomes.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Content(String),
    /// The `index`-th call begins: its id and name (its arguments follow in `CallArgs`).
    CallBegin(usize, String, String),
    /// More of the `index`-th call's arguments; together they are the call's `arguments`.
    CallArgs(usize, String),
    /// The `index`-th call of the response, whole (after its `CallBegin` and `CallArgs`).
    Call(usize, ToolCall),
}

const DS_CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const DS_CALLS_END: &str = "<｜tool▁calls▁end｜>";
const DS_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const DS_CALL_END: &str = "<｜tool▁call▁end｜>";
const DS_SEP: &str = "<｜tool▁sep｜>";
const KIMI_ARG: &str = "<|tool_call_argument_begin|>";

impl ToolParser {
    /// vLLM's name for the parser.
    pub fn parse_name(name: &str) -> Option<Self> {
        match name {
            "kimi_k2" => Some(Self::KimiK2),
            "deepseek_v3" => Some(Self::DeepSeekV3),
            "deepseek_v31" => Some(Self::DeepSeekV31),
            _ => None,
        }
    }

    /// The parser a model folder needs, from its tokenizer's special tokens and its chat
    /// template: Kimi's section markers; DeepSeek's markers, V3/R1 when the template writes
    /// arguments in a ```json block, else V3.1.
    pub fn detect(tokenizer: &Tokenizer, template_source: Option<&str>) -> Option<Self> {
        if tokenizer
            .token_to_id("<|tool_calls_section_begin|>")
            .is_some()
        {
            return Some(Self::KimiK2);
        }
        tokenizer.token_to_id(DS_CALLS_BEGIN)?;
        Some(match template_source {
            Some(t) if t.contains("```json") => Self::DeepSeekV3,
            _ => Self::DeepSeekV31,
        })
    }

    /// Ids of every marker the parser reads, which the output text must keep.
    pub fn marker_ids(self, tokenizer: &Tokenizer) -> Vec<u32> {
        let extra = match self {
            Self::KimiK2 => KIMI_ARG,
            Self::DeepSeekV3 | Self::DeepSeekV31 => DS_SEP,
        };
        self.markers()
            .into_iter()
            .chain([extra])
            .filter_map(|m| tokenizer.token_to_id(m))
            .collect()
    }

    /// The start of a call written for the model when `tool_choice` demands one: the section's
    /// opening (`required`), or a whole call header naming `name` (a named function), after
    /// which the model writes the arguments. `index` numbers Kimi's call ids (calls so far in
    /// the conversation).
    pub fn forced_prefix(self, name: Option<&str>, index: usize) -> String {
        let [section_begin, _, call_begin, _] = self.markers();
        let Some(name) = name else {
            return section_begin.to_owned();
        };
        match self {
            Self::KimiK2 => {
                format!("{section_begin}{call_begin}functions.{name}:{index}{KIMI_ARG}")
            }
            Self::DeepSeekV3 => {
                format!("{section_begin}{call_begin}function{DS_SEP}{name}\n```json\n")
            }
            Self::DeepSeekV31 => format!("{section_begin}{call_begin}{name}{DS_SEP}"),
        }
    }

    /// The grammar (llguidance Lark) of what the model writes after [`Self::forced_prefix`]:
    /// `name`'s arguments valid against its schema and the call's and section's ends, or, for
    /// `required` (`name` `None`), one call (or several when `parallel`) of any of `tools`,
    /// each with arguments valid against its own schema. `id` finds a marker's token id.
    pub fn call_grammar(
        self,
        tools: &[serde_json::Value],
        name: Option<&str>,
        parallel: bool,
        id: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<String, String> {
        let tok = |m: &str| {
            id(m).map(|i| format!("<[{i}]>")).ok_or_else(|| {
                format!(
                    "the tokenizer has no {m} token, which {} tool calls need",
                    self.name()
                )
            })
        };
        let [_, section_end, call_begin, call_end] = self.markers();
        let (section_end, call_begin, call_end) =
            (tok(section_end)?, tok(call_begin)?, tok(call_end)?);
        let lit = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let schema = |t: &serde_json::Value| {
            let p = &t["function"]["parameters"];
            let p = if p.is_object() {
                p.clone()
            } else {
                serde_json::json!({"type": "object"})
            };
            format!("%json {}", crate::structured::json_layout(p))
        };
        // What follows the arguments inside one call.
        let after_args = match self {
            Self::DeepSeekV3 => format!("{} {call_end}", lit("\n```")),
            Self::KimiK2 | Self::DeepSeekV31 => call_end.clone(),
        };
        if let Some(name) = name {
            let t = tools
                .iter()
                .find(|t| t["function"]["name"] == name)
                .ok_or_else(|| format!("tool_choice names {name:?}, which is not among tools"))?;
            return Ok(format!("start: {} {after_args} {section_end}\n", schema(t)));
        }
        let mut rules = String::new();
        let mut alternatives = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            let name = t["function"]["name"].as_str().unwrap_or_default();
            let head = match self {
                Self::KimiK2 => format!(
                    "{call_begin} {} /[0-9]{{1,4}}/ {}",
                    lit(&format!("functions.{name}:")),
                    tok(KIMI_ARG)?
                ),
                Self::DeepSeekV3 => format!(
                    "{call_begin} {} {} {}",
                    lit("function"),
                    tok(DS_SEP)?,
                    lit(&format!("{name}\n```json\n"))
                ),
                Self::DeepSeekV31 => format!("{call_begin} {} {}", lit(name), tok(DS_SEP)?),
            };
            rules.push_str(&format!("call_{i}: {head} {} {after_args}\n", schema(t)));
            alternatives.push(format!("call_{i}"));
        }
        if alternatives.is_empty() {
            return Err("tool_choice \"required\" needs at least one tool".into());
        }
        let repeat = if parallel { "+" } else { "" };
        Ok(format!(
            "start: call{repeat} {section_end}\ncall: {}\n{rules}",
            alternatives.join(" | ")
        ))
    }

    /// vLLM's name of this parser.
    pub fn name(self) -> &'static str {
        match self {
            Self::KimiK2 => "kimi_k2",
            Self::DeepSeekV3 => "deepseek_v3",
            Self::DeepSeekV31 => "deepseek_v31",
        }
    }

    fn markers(self) -> [&'static str; 4] {
        match self {
            Self::KimiK2 => [
                "<|tool_calls_section_begin|>",
                "<|tool_calls_section_end|>",
                "<|tool_call_begin|>",
                "<|tool_call_end|>",
            ],
            Self::DeepSeekV3 | Self::DeepSeekV31 => {
                [DS_CALLS_BEGIN, DS_CALLS_END, DS_CALL_BEGIN, DS_CALL_END]
            }
        }
    }

    /// A call's id and name once the text after its begin marker has them whole, and where
    /// its arguments start; `None` until then (or if that text is not a call header).
    fn header(self, body: &str, index: usize, id_prefix: &str) -> Option<(String, String, usize)> {
        let generated_id = || format!("{id_prefix}-{index}");
        let (id, name, start) = match self {
            Self::KimiK2 => {
                let at = body.find(KIMI_ARG)?;
                let id = body[..at].trim();
                let name = id.strip_prefix("functions.").unwrap_or(id);
                let name = name.rsplit_once(':').map_or(name, |(n, _)| n);
                (id.to_owned(), name.to_owned(), at + KIMI_ARG.len())
            }
            Self::DeepSeekV3 => {
                let after = body.find(DS_SEP)? + DS_SEP.len();
                let line = body[after..].find('\n')?;
                let name = body[after..after + line].trim();
                let rest = &body[after + line + 1..];
                let lead = rest.len() - rest.trim_start().len();
                if !rest[lead..].starts_with("```json") {
                    return None;
                }
                (
                    generated_id(),
                    name.to_owned(),
                    after + line + 1 + lead + "```json".len(),
                )
            }
            Self::DeepSeekV31 => {
                let at = body.find(DS_SEP)?;
                (
                    generated_id(),
                    body[..at].trim().to_owned(),
                    at + DS_SEP.len(),
                )
            }
        };
        (!name.is_empty()).then_some((id, name, start))
    }

    /// The part of a call's unfinished argument text that is surely arguments: leading and
    /// trailing whitespace and whatever could still be the start of the call's end are held
    /// back, so what is released is always a prefix of the finished call's `arguments`.
    fn sure_arguments(self, args: &str) -> &str {
        let [_, _, _, call_end] = self.markers();
        let mut s = args.trim_start();
        loop {
            let t = s.trim_end();
            let t = &t[..t.len() - partial_suffix(t, call_end)];
            let t = match self {
                Self::DeepSeekV3 => {
                    let t = t.trim_end();
                    let fence =
                        partial_suffix(t, "```").max(if t.ends_with("```") { 3 } else { 0 });
                    &t[..t.len() - fence]
                }
                Self::KimiK2 | Self::DeepSeekV31 => t,
            };
            if t.len() == s.len() {
                return s;
            }
            s = t;
        }
    }

    /// A call's finished arguments from the text after its header; `None` if the call does
    /// not end as its syntax says (DeepSeek V3's closing ``` fence).
    fn finished_arguments(self, args: &str) -> Option<&str> {
        match self {
            Self::DeepSeekV3 => args.trim_end().strip_suffix("```").map(str::trim),
            Self::KimiK2 | Self::DeepSeekV31 => Some(args.trim()),
        }
    }
}

/// Splits streamed output into content and tool calls as it arrives: content is released as
/// soon as it cannot be the start of a call section, a call once its end marker is in.
pub struct ToolStream {
    parser: ToolParser,
    id_prefix: String,
    buf: String,
    in_section: bool,
    calls: usize,
    /// The call being streamed (announced): bytes of its arguments released so far.
    open: Option<usize>,
}

impl ToolStream {
    /// `id_prefix` names the calls of parsers whose output carries no id.
    pub fn new(parser: ToolParser, id_prefix: &str) -> Self {
        Self {
            parser,
            id_prefix: id_prefix.to_owned(),
            buf: String::new(),
            in_section: false,
            calls: 0,
            open: None,
        }
    }

    /// A call whose end has not arrived: once its header is whole, announce it, then release
    /// its arguments as they become sure.
    fn stream_open_call(&mut self, body_start: usize, out: &mut Vec<Delta>) {
        let body = &self.buf[body_start..];
        let index = self.calls;
        let Some((id, name, start)) = self.parser.header(body, index, &self.id_prefix) else {
            return;
        };
        let released = self.open.get_or_insert_with(|| {
            out.push(Delta::CallBegin(index, id, name));
            0
        });
        let sure = self.parser.sure_arguments(&body[start..]);
        if let Some(more) = sure.get(*released..).filter(|m| !m.is_empty()) {
            out.push(Delta::CallArgs(index, more.to_owned()));
            *released = sure.len();
        }
    }

    /// Ends the current call, `body` the text after its begin marker: announced if it was
    /// not, the rest of its arguments, then the call. A call that does not end as its syntax
    /// says keeps the arguments written when it was `cut_off` (by `max_tokens`) or already
    /// announced; otherwise it is no call (`false`).
    fn close_call(&mut self, body: &str, cut_off: bool, out: &mut Vec<Delta>) -> bool {
        let index = self.calls;
        let open = self.open.take();
        let Some((id, name, start)) = self.parser.header(body, index, &self.id_prefix) else {
            return false;
        };
        let raw = &body[start..];
        let arguments = match self.parser.finished_arguments(raw) {
            Some(a) => a,
            None if cut_off || open.is_some() => raw.trim(),
            None => return false,
        };
        let released = open.unwrap_or_else(|| {
            out.push(Delta::CallBegin(index, id.clone(), name.clone()));
            0
        });
        if let Some(rest) = arguments.get(released..).filter(|r| !r.is_empty()) {
            out.push(Delta::CallArgs(index, rest.to_owned()));
        }
        let arguments = arguments.to_owned();
        out.push(Delta::Call(
            index,
            ToolCall {
                id,
                name,
                arguments,
            },
        ));
        self.calls += 1;
        true
    }

    /// Calls found so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    pub fn push(&mut self, piece: &str) -> Vec<Delta> {
        self.buf.push_str(piece);
        let [section_begin, section_end, call_begin, call_end] = self.parser.markers();
        let mut out = Vec::new();
        loop {
            if !self.in_section {
                if let Some(at) = self.buf.find(section_begin) {
                    push_content(&mut out, &self.buf[..at]);
                    self.buf.drain(..at + section_begin.len());
                    self.in_section = true;
                    continue;
                }
                // Hold back what could be the start of the section marker.
                let keep = partial_suffix(&self.buf, section_begin);
                let release = self.buf.len() - keep;
                push_content(&mut out, &self.buf[..release]);
                self.buf.drain(..release);
                return out;
            }
            let begin = self.buf.find(call_begin);
            let end_section = self.buf.find(section_end);
            match (begin, end_section) {
                (Some(b), e) if e.is_none_or(|e| b < e) => {
                    let body_start = b + call_begin.len();
                    let Some(len) = self.buf[b..].find(call_end) else {
                        self.stream_open_call(body_start, &mut out);
                        return out;
                    };
                    let body = self.buf[body_start..b + len].to_owned();
                    if !self.close_call(&body, false, &mut out) {
                        // Not a call after all: keep the model's text as content.
                        push_content(&mut out, &self.buf[b..b + len + call_end.len()]);
                    }
                    self.buf.drain(..b + len + call_end.len());
                }
                (_, Some(e)) => {
                    self.buf.drain(..e + section_end.len());
                    self.in_section = false;
                }
                _ => return out,
            }
        }
    }

    /// The end of the output: held-back text is content; a call cut off (by `max_tokens`) is
    /// given with the arguments written so far, as OpenAI gives a truncated call.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        if !self.in_section {
            push_content(&mut out, &rest);
            return out;
        }
        let [_, _, call_begin, _] = self.parser.markers();
        if let Some(b) = rest.find(call_begin) {
            // A call cut off (a DeepSeek V3 one inside its ```json block) keeps what it wrote.
            self.close_call(&rest[b + call_begin.len()..], true, &mut out);
        }
        out
    }
}

fn push_content(out: &mut Vec<Delta>, s: &str) {
    if s.is_empty() {
        return;
    }
    if let Some(Delta::Content(prev)) = out.last_mut() {
        prev.push_str(s);
    } else {
        out.push(Delta::Content(s.to_owned()));
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of `marker`, on a character
/// boundary.
pub(crate) fn partial_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && marker.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

/// Content and calls of a whole output.
pub fn parse(parser: ToolParser, text: &str, id_prefix: &str) -> (String, Vec<ToolCall>) {
    parse_pieces(parser, [text], id_prefix)
}

/// Content and calls of an output that arrives in `pieces`.
fn parse_pieces<'a>(
    parser: ToolParser,
    pieces: impl IntoIterator<Item = &'a str>,
    id_prefix: &str,
) -> (String, Vec<ToolCall>) {
    let mut s = ToolStream::new(parser, id_prefix);
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut take = |deltas: Vec<Delta>| {
        for d in deltas {
            match d {
                Delta::Content(c) => content.push_str(&c),
                Delta::Call(i, c) => {
                    debug_assert_eq!(i, calls.len(), "calls are numbered in order");
                    calls.push(c);
                }
                Delta::CallBegin(..) | Delta::CallArgs(..) => {}
            }
        }
    };
    for piece in pieces {
        take(s.push(piece));
    }
    take(s.finish());
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIMI: &str = "Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_call_begin|>functions.search:1<|tool_call_argument_begin|>{\"q\": \"x\"}<|tool_call_end|><|tool_calls_section_end|>";

    #[test]
    fn kimi_calls_whole_and_streamed_byte_by_byte() {
        let (content, calls) = parse(ToolParser::KimiK2, KIMI, "call");
        assert_eq!(content, "Let me check.");
        assert_eq!(
            calls,
            vec![
                ToolCall {
                    id: "functions.get_weather:0".into(),
                    name: "get_weather".into(),
                    arguments: "{\"city\": \"Paris\"}".into()
                },
                ToolCall {
                    id: "functions.search:1".into(),
                    name: "search".into(),
                    arguments: "{\"q\": \"x\"}".into()
                },
            ]
        );
        // Any split of the text gives the same content and calls.
        let mut s = ToolStream::new(ToolParser::KimiK2, "call");
        let mut deltas = Vec::new();
        for c in KIMI.chars() {
            deltas.extend(s.push(&c.to_string()));
        }
        deltas.extend(s.finish());
        let streamed: String = deltas
            .iter()
            .filter_map(|d| match d {
                Delta::Content(c) => Some(c.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(streamed, "Let me check.");
        let n = deltas
            .iter()
            .filter(|d| matches!(d, Delta::Call(..)))
            .count();
        assert_eq!(n, 2);
    }

    #[test]
    fn deepseek_v3_and_v31_syntax() {
        let v3 = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>search\n```json\n{\"q\": \"x\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let (content, calls) = parse(ToolParser::DeepSeekV3, v3, "chatcmpl-7");
        assert_eq!(content, "");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, "{\"city\": \"Paris\"}");
        assert_eq!(calls[1].id, "chatcmpl-7-1");
        let v31 = "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let (content, calls) = parse(ToolParser::DeepSeekV31, v31, "c");
        assert_eq!(content, "Sure.");
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, "{\"city\": \"Paris\"}");
    }

    /// Every parser, the text split in two at every character boundary (and fed a character at a
    /// time): the streamed content and calls are the whole text's.
    #[test]
    fn every_split_of_a_stream_gives_the_whole_texts_calls() {
        let v3 = "Hm.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>search\n```json\n{\"q\": \"x\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let v31 = "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        for (p, text) in [
            (ToolParser::KimiK2, KIMI),
            (ToolParser::DeepSeekV3, v3),
            (ToolParser::DeepSeekV31, v31),
        ] {
            let whole = parse(p, text, "c");
            assert!(!whole.1.is_empty(), "{p:?}");
            // What a stream sends of each call: its begin, then its arguments in pieces.
            let announced = |pieces: &[&str]| {
                let mut s = ToolStream::new(p, "c");
                let mut deltas: Vec<Delta> = pieces.iter().flat_map(|x| s.push(x)).collect();
                deltas.extend(s.finish());
                let mut calls: Vec<ToolCall> = Vec::new();
                for d in deltas {
                    match d {
                        Delta::CallBegin(i, id, name) => {
                            assert_eq!(i, calls.len());
                            calls.push(ToolCall {
                                id,
                                name,
                                arguments: String::new(),
                            });
                        }
                        Delta::CallArgs(i, a) => calls[i].arguments.push_str(&a),
                        Delta::Content(_) | Delta::Call(..) => {}
                    }
                }
                calls
            };
            for (cut, _) in text.char_indices().skip(1) {
                let (a, b) = text.split_at(cut);
                assert_eq!(parse_pieces(p, [a, b], "c"), whole, "{p:?} cut at {cut}");
                assert_eq!(announced(&[a, b]), whole.1, "{p:?} streamed, cut at {cut}");
            }
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
            let one_by_one = parse_pieces(p, chars.iter().copied(), "c");
            assert_eq!(one_by_one, whole, "{p:?} a character at a time");
            let pieces = announced(&chars);
            assert_eq!(pieces, whole.1, "{p:?} streamed a character at a time");
        }
    }

    #[test]
    fn text_without_calls_is_content_and_cut_off_calls_keep_their_arguments() {
        let (content, calls) = parse(ToolParser::KimiK2, "plain <|tool", "c");
        assert_eq!((content.as_str(), calls.len()), ("plain <|tool", 0));
        let (content, calls) = parse(
            ToolParser::KimiK2,
            "a<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{\"x\": 1",
            "c",
        );
        assert_eq!(content, "a");
        assert_eq!(
            (calls[0].name.as_str(), calls[0].arguments.as_str()),
            ("f", "{\"x\": 1")
        );
        let (_, calls) = parse(
            ToolParser::DeepSeekV3,
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>g\n```json\n{\"y\"",
            "c",
        );
        assert_eq!(
            (calls[0].name.as_str(), calls[0].arguments.as_str()),
            ("g", "{\"y\"")
        );
        // A section opened without a call header gives nothing.
        let (content, calls) = parse(ToolParser::KimiK2, "b<|tool_calls_section_begin|>xyz", "c");
        assert_eq!((content.as_str(), calls.len()), ("b", 0));
    }

    #[test]
    fn forced_prefixes_start_a_call_the_parser_reads() {
        for p in [
            ToolParser::KimiK2,
            ToolParser::DeepSeekV3,
            ToolParser::DeepSeekV31,
        ] {
            let prefix = p.forced_prefix(Some("get_weather"), 2);
            let (_, calls) = parse(p, &format!("{prefix}{{\"city\": \"Paris\"}}"), "c");
            assert_eq!(calls.len(), 1, "{p:?}");
            assert_eq!(calls[0].name, "get_weather");
            assert_eq!(calls[0].arguments, "{\"city\": \"Paris\"}");
            assert!(p.forced_prefix(None, 0).contains("calls"));
        }
        assert_eq!(
            parse(
                ToolParser::KimiK2,
                &ToolParser::KimiK2.forced_prefix(Some("f"), 2),
                "c"
            )
            .1[0]
                .id,
            "functions.f:2"
        );
    }

    /// Follows a grammar with the bundled tokenizer, each marker standing for one of its
    /// special tokens: every piece must be allowed, token by token, and then only EOS.
    fn follows(grammar: &str, pieces: &[Result<&str, u32>]) -> Result<(), String> {
        let dir = crate::engine::bundled_model_dir();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let eos = tok.token_to_id("<|eos|>").unwrap();
        let g = crate::structured::Grammars::new(&dir, &tok, tok.vocab_size(), eos).unwrap();
        let mut c = g
            .constraint(crate::structured::lark(grammar.to_owned()))
            .map_err(|e| format!("{e:#}"))?;
        let allowed = |c: &mut crate::structured::Constraint, id: u32| {
            let mut l = vec![0.0f32; tok.vocab_size()];
            c.mask(&mut l).unwrap();
            l[id as usize].is_finite()
        };
        for piece in pieces {
            let ids = match piece {
                Ok(text) => tok.encode_plain(text).unwrap(),
                Err(id) => vec![*id],
            };
            for id in ids {
                if !allowed(&mut c, id) {
                    return Err(format!("token {id} refused in {piece:?}"));
                }
                c.advance(id).unwrap();
            }
        }
        let mut l = vec![0.0f32; tok.vocab_size()];
        c.mask(&mut l).unwrap();
        let open: Vec<usize> = (0..l.len()).filter(|&i| l[i].is_finite()).collect();
        if open != [eos as usize] {
            return Err(format!("after the call, {} tokens are allowed", open.len()));
        }
        Ok(())
    }

    #[test]
    fn call_grammars_admit_valid_calls_and_nothing_after() {
        let tools = vec![
            serde_json::json!({"type": "function", "function": {"name": "set_level", "parameters": {
                "type": "object", "properties": {"level": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["level"], "additionalProperties": false}}}),
            serde_json::json!({"type": "function", "function": {"name": "ping"}}),
        ];
        // The bundled tokenizer's specials (ids 3, 4) stand in for each parser's markers.
        let markers: std::collections::HashMap<&str, u32> = [
            ("<|tool_calls_section_end|>", 3),
            ("<|tool_call_begin|>", 4),
            ("<|tool_call_end|>", 3),
            (KIMI_ARG, 4),
            (DS_CALLS_END, 3),
            (DS_CALL_BEGIN, 4),
            (DS_CALL_END, 3),
            (DS_SEP, 4),
        ]
        .into();
        let id = |m: &str| markers.get(m).copied();
        let args = Ok("{\"level\": 7}");
        for p in [
            ToolParser::KimiK2,
            ToolParser::DeepSeekV3,
            ToolParser::DeepSeekV31,
        ] {
            let named = p
                .call_grammar(&tools, Some("set_level"), true, &id)
                .unwrap();
            let mut after: Vec<Result<&str, u32>> = vec![args];
            if p == ToolParser::DeepSeekV3 {
                after.push(Ok("\n```"));
            }
            after.extend([Err(3), Err(3)]);
            follows(&named, &after).unwrap_or_else(|e| panic!("{p:?} named: {e}\n{named}"));
            // Arguments outside the schema are refused.
            assert!(follows(&named, &[Ok("{\"level\": 12}")]).is_err(), "{p:?}");
            assert!(follows(&named, &[Ok("{\"other\": 1}")]).is_err(), "{p:?}");

            let head: Vec<Result<&str, u32>> = match p {
                ToolParser::KimiK2 => vec![Err(4), Ok("functions.set_level:0"), Err(4)],
                ToolParser::DeepSeekV3 => {
                    vec![Err(4), Ok("function"), Err(4), Ok("set_level\n```json\n")]
                }
                ToolParser::DeepSeekV31 => vec![Err(4), Ok("set_level"), Err(4)],
            };
            let mut call = head.clone();
            call.push(args);
            if p == ToolParser::DeepSeekV3 {
                call.push(Ok("\n```"));
            }
            call.push(Err(3));
            let required = p.call_grammar(&tools, None, true, &id).unwrap();
            let two: Vec<_> = call.iter().chain(&call).cloned().chain([Err(3)]).collect();
            follows(&required, &two).unwrap_or_else(|e| panic!("{p:?} required: {e}\n{required}"));
            let one = p.call_grammar(&tools, None, false, &id).unwrap();
            assert!(
                follows(&one, &two).is_err(),
                "{p:?}: a second call without parallel calls"
            );
        }
        assert!(ToolParser::KimiK2
            .call_grammar(&tools, Some("launch"), true, &id)
            .is_err());
        assert!(ToolParser::KimiK2
            .call_grammar(&tools, None, true, &|_| None)
            .unwrap_err()
            .contains("no <|tool_calls_section_end|> token"));
    }
}
