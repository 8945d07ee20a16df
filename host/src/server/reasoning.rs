//! A reasoning model's thinking split from its answer: `<think>…</think>` (DeepSeek-R1,
//! DeepSeek-V3.1 with `thinking`, Kimi-K2-Thinking) becomes `reasoning_content`, the rest
//! `content`, as DeepSeek's API and vLLM's `--reasoning-parser` give them.
//!
//! A template may open the block itself (R1's generation prompt ends in `<think>\n`), so the
//! output starts inside it; otherwise a block counts only at the very start of the output.
//!
//! Owns: the split, whole or streaming. Does not own: tool calls (`tools`, fed the content).

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// A piece of output.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Reasoning(String),
    Content(String),
}

pub struct ReasoningStream {
    state: State,
    buf: String,
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    /// Nothing seen yet: the output may open a block.
    Start,
    Thinking,
    Answer,
}

impl ReasoningStream {
    /// `opened`: the prompt ends inside a thinking block.
    pub fn new(opened: bool) -> Self {
        Self {
            state: if opened {
                State::Thinking
            } else {
                State::Start
            },
            buf: String::new(),
        }
    }

    /// Whether a rendered prompt leaves the model inside a thinking block.
    pub fn prompt_opens_block(prompt: &str) -> bool {
        let p = prompt.trim_end();
        p.ends_with(OPEN)
    }

    pub fn push(&mut self, piece: &str) -> Vec<Part> {
        self.buf.push_str(piece);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Start => {
                    let t = self.buf.trim_start();
                    if let Some(rest) = t.strip_prefix(OPEN).map(str::to_owned) {
                        self.buf = rest;
                        self.state = State::Thinking;
                    } else if !t.is_empty() && !OPEN.starts_with(t) {
                        self.state = State::Answer;
                    } else {
                        return out;
                    }
                }
                State::Thinking => match self.buf.find(CLOSE) {
                    Some(at) => {
                        push(&mut out, Part::Reasoning(self.buf[..at].to_owned()));
                        self.buf.drain(..at + CLOSE.len());
                        self.state = State::Answer;
                    }
                    None => {
                        let keep = super::tools::partial_suffix(&self.buf, CLOSE);
                        let release = self.buf.len() - keep;
                        push(&mut out, Part::Reasoning(self.buf[..release].to_owned()));
                        self.buf.drain(..release);
                        return out;
                    }
                },
                State::Answer => {
                    push(&mut out, Part::Content(std::mem::take(&mut self.buf)));
                    return out;
                }
            }
        }
    }

    /// The end of the output: whatever is held back goes where it was heading.
    pub fn finish(&mut self) -> Vec<Part> {
        let rest = std::mem::take(&mut self.buf);
        let mut out = Vec::new();
        match self.state {
            State::Thinking => push(&mut out, Part::Reasoning(rest)),
            State::Start | State::Answer => push(&mut out, Part::Content(rest)),
        }
        out
    }
}

fn push(out: &mut Vec<Part>, part: Part) {
    match (&part, out.last_mut()) {
        (Part::Reasoning(s) | Part::Content(s), _) if s.is_empty() => {}
        (Part::Reasoning(s), Some(Part::Reasoning(prev))) => prev.push_str(s),
        (Part::Content(s), Some(Part::Content(prev))) => prev.push_str(s),
        _ => out.push(part),
    }
}

/// Reasoning and content of a whole output.
pub fn split(opened: bool, text: &str) -> (String, String) {
    let mut s = ReasoningStream::new(opened);
    let mut parts = s.push(text);
    parts.extend(s.finish());
    let (mut reasoning, mut content) = (String::new(), String::new());
    for p in parts {
        match p {
            Part::Reasoning(r) => reasoning.push_str(&r),
            Part::Content(c) => content.push_str(&c),
        }
    }
    (reasoning, content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_opened_by_the_prompt_or_the_output() {
        assert_eq!(
            split(true, "91 = 7 * 13.\n</think>\n\nNo."),
            ("91 = 7 * 13.\n".into(), "\n\nNo.".into())
        );
        assert_eq!(
            split(false, "<think>hmm</think>Yes."),
            ("hmm".into(), "Yes.".into())
        );
        assert_eq!(
            split(false, "Plain <think> later"),
            ("".into(), "Plain <think> later".into())
        );
        // Cut off while thinking: all of it is reasoning.
        assert_eq!(
            split(true, "still thinking"),
            ("still thinking".into(), "".into())
        );
        assert!(ReasoningStream::prompt_opens_block(
            "<｜Assistant｜><think>\n"
        ));
        assert!(!ReasoningStream::prompt_opens_block(
            "<｜Assistant｜></think>"
        ));
    }

    #[test]
    fn any_split_of_the_stream_gives_the_same_parts() {
        let text = "<think>a</thi nk> b</think>answer </think>";
        let whole = split(false, text);
        for cut in 0..text.len() {
            if !text.is_char_boundary(cut) {
                continue;
            }
            let mut s = ReasoningStream::new(false);
            let mut parts = s.push(&text[..cut]);
            parts.extend(s.push(&text[cut..]));
            parts.extend(s.finish());
            let (mut r, mut c) = (String::new(), String::new());
            for p in parts {
                match p {
                    Part::Reasoning(x) => r.push_str(&x),
                    Part::Content(x) => c.push_str(&x),
                }
            }
            assert_eq!((r, c), whole, "cut at {cut}");
        }
        assert_eq!(whole, ("a</thi nk> b".into(), "answer </think>".into()));
    }
}
