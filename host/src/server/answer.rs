//! A chat answer read as it streams: the thinking block (`reasoning`), then the content, with
//! tool calls taken out of it (`tools`).
//!
//! Owns: chaining the two readers and the request's rules (`parallel_tool_calls`). Does not own:
//! the syntaxes (`reasoning`, `tools`) or the HTTP shapes (`openai`).

use super::reasoning::{Part, ReasoningStream};
use super::tools::{Delta, ToolCall, ToolParser, ToolStream};

/// How a chat's answer is read.
#[derive(Clone, Copy, Default)]
pub struct ChatRead {
    /// Parse tool calls with this parser; `parallel`: keep every call, else the first.
    pub tools: Option<(ToolParser, bool)>,
    /// Split off a thinking block; `Some(true)`: the prompt already opened it.
    pub reasoning: Option<bool>,
}

/// A piece of the answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Reasoning(String),
    Content(String),
    /// A call begins: index, id, name (streams announce it, then its arguments in pieces).
    CallBegin(usize, String, String),
    CallArgs(usize, String),
    /// A call, whole (after its begin and arguments).
    Call(usize, ToolCall),
}

pub struct ChatReader {
    reasoning: Option<ReasoningStream>,
    tools: Option<ToolStream>,
    parallel: bool,
}

impl ChatReader {
    /// `id` names the calls of parsers whose output carries no id.
    pub fn new(read: ChatRead, id: &str) -> Self {
        Self {
            reasoning: read.reasoning.map(ReasoningStream::new),
            tools: read.tools.map(|(p, _)| ToolStream::new(p, id)),
            parallel: read.tools.is_none_or(|(_, parallel)| parallel),
        }
    }

    /// Calls found so far.
    pub fn calls(&self) -> usize {
        self.tools.as_ref().map_or(0, |t| {
            t.calls().min(if self.parallel { usize::MAX } else { 1 })
        })
    }

    pub fn push(&mut self, text: &str) -> Vec<Out> {
        let parts = match self.reasoning.as_mut() {
            Some(r) => r.push(text),
            None => vec![Part::Content(text.to_owned())],
        };
        self.route(parts, false)
    }

    pub fn finish(&mut self) -> Vec<Out> {
        let parts = self
            .reasoning
            .as_mut()
            .map(|r| r.finish())
            .unwrap_or_default();
        self.route(parts, true)
    }

    fn route(&mut self, parts: Vec<Part>, end: bool) -> Vec<Out> {
        let mut out = Vec::new();
        let mut deltas = Vec::new();
        for p in parts {
            match p {
                Part::Reasoning(r) => out.push(Out::Reasoning(r)),
                Part::Content(c) => match self.tools.as_mut() {
                    Some(t) => deltas.extend(t.push(&c)),
                    None => out.push(Out::Content(c)),
                },
            }
        }
        if end {
            if let Some(t) = self.tools.as_mut() {
                deltas.extend(t.finish());
            }
        }
        let kept = |i: usize| i == 0 || self.parallel;
        for d in deltas {
            match d {
                Delta::Content(c) => out.push(Out::Content(c)),
                Delta::CallBegin(i, id, name) if kept(i) => out.push(Out::CallBegin(i, id, name)),
                Delta::CallArgs(i, a) if kept(i) => out.push(Out::CallArgs(i, a)),
                Delta::Call(i, c) if kept(i) => out.push(Out::Call(i, c)),
                Delta::CallBegin(..) | Delta::CallArgs(..) | Delta::Call(..) => {}
            }
        }
        out
    }
}

/// A whole answer: reasoning, content and calls.
pub fn read_whole(read: ChatRead, text: &str, id: &str) -> (String, String, Vec<ToolCall>) {
    let mut r = ChatReader::new(read, id);
    let mut outs = r.push(text);
    outs.extend(r.finish());
    let (mut reasoning, mut content, mut calls) = (String::new(), String::new(), Vec::new());
    for o in outs {
        match o {
            Out::Reasoning(s) => reasoning.push_str(&s),
            Out::Content(s) => content.push_str(&s),
            Out::Call(_, c) => calls.push(c),
            Out::CallBegin(..) | Out::CallArgs(..) => {}
        }
    }
    (reasoning, content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_then_content_then_calls() {
        let read = ChatRead {
            tools: Some((ToolParser::KimiK2, false)),
            reasoning: Some(false),
        };
        let text = "<think>need the weather</think>Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.a:0<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_call_begin|>functions.b:1<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>";
        let (r, c, calls) = read_whole(read, text, "x");
        assert_eq!((r.as_str(), c.as_str()), ("need the weather", "Checking."));
        // parallel_tool_calls false: the first call only.
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "a");
    }
}
