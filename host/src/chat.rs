//! A model folder's chat template: found where its owners publish it and compiled when the
//! folder is opened (before any weight is read), rendered per request.
//!
//! Owns: finding the template (`chat_template.jinja`, or `tokenizer_config.json`'s
//! `chat_template` as a string or as a list of named templates, the one named `default`),
//! the `bos_token`/`eos_token` strings it may use, rendering. Does not own: the HTTP shapes
//! (`server::openai`), tokenization (`tokenizer`).

use anyhow::{Context, Result};
use std::path::Path;

/// A compiled chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
    /// Where it came from, for messages.
    pub source: String,
    /// The template's text.
    pub text: String,
}

impl ChatTemplate {
    /// The folder's template, `None` if it has none; an error if one is there but does not
    /// parse.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", config_path.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let (template, source) = if jinja_path.exists() {
            let text = std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("cannot read {}", jinja_path.display()))?;
            (text, jinja_path.display().to_string())
        } else {
            let source = format!("the chat_template of {}", config_path.display());
            match config.get("chat_template") {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(serde_json::Value::String(s)) => (s.clone(), source),
                Some(serde_json::Value::Array(named)) => {
                    let default = named
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                    let Some(t) = default.and_then(|t| t.get("template")?.as_str()) else {
                        anyhow::bail!(
                            "{source}: a list of templates without one named \"default\""
                        );
                    };
                    (t.to_owned(), source)
                }
                Some(_) => {
                    anyhow::bail!("{source} is neither a string nor a list of named templates")
                }
            }
        };
        let token = |key: &str| -> String {
            match config.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                None => String::new(),
            }
        };
        let mut env = template_environment();
        env.add_template_owned("chat", template.clone())
            .with_context(|| format!("{source} does not parse"))?;
        Ok(Some(Self {
            env,
            text: template,
            bos: token("bos_token"),
            eos: token("eos_token"),
            source,
        }))
    }

    /// The prompt text of a chat as transformers' `apply_chat_template` renders it: the
    /// messages as given (OpenAI's objects: `content` a string, null or a list of parts,
    /// `tool_calls`, `tool_call_id`, `name`, `reasoning_content`...), `tools`, the
    /// `bos_token`/`eos_token` strings, and extra variables (`chat_template_kwargs`, e.g.
    /// `thinking`), which may not override the others.
    pub fn render_chat(&self, input: &ChatInput<'_>) -> Result<String, minijinja::Error> {
        let mut ctx: serde_json::Map<String, serde_json::Value> = input.kwargs.clone();
        ctx.insert("messages".into(), input.messages.to_vec().into());
        if let Some(t) = input.tools {
            ctx.insert("tools".into(), t.to_vec().into());
        }
        ctx.insert(
            "add_generation_prompt".into(),
            input.add_generation_prompt.into(),
        );
        ctx.insert("bos_token".into(), self.bos.clone().into());
        ctx.insert("eos_token".into(), self.eos.clone().into());
        let tmpl = self.env.get_template("chat")?;
        tmpl.render(minijinja::Value::from_serialize(&ctx))
    }
}

/// Marks a user's text while a prompt renders (private-use characters, removed from the text
/// first), so the rendered prompt shows where user text went.
const USER_OPEN: char = '\u{E000}';
const USER_CLOSE: char = '\u{E001}';

/// A copy of `value` with every string marked as user text, except the values of `role` and
/// `type` keys, which templates compare against their own words.
pub fn mark_user_text(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        J::String(s) => {
            let clean: String = s
                .chars()
                .filter(|&c| c != USER_OPEN && c != USER_CLOSE)
                .collect();
            J::String(format!("{USER_OPEN}{clean}{USER_CLOSE}"))
        }
        J::Array(items) => J::Array(items.iter().map(mark_user_text).collect()),
        J::Object(map) => J::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if !is_user_text_key(k) {
                        v.clone()
                    } else {
                        mark_user_text(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A prompt rendered from marked text, as `(text, is_user_text)` segments without the marks.
/// A mark left unpaired by the template (e.g. a `split` that cut one off) is dropped and its
/// text counts as the template's.
pub fn split_marked(prompt: &str) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = Vec::new();
    let mut cur = String::new();
    let mut in_user = false;
    for c in prompt.chars() {
        match c {
            USER_OPEN if !in_user => {
                out.push((std::mem::take(&mut cur), false));
                in_user = true;
            }
            USER_CLOSE if in_user => {
                out.push((std::mem::take(&mut cur), true));
                in_user = false;
            }
            USER_OPEN | USER_CLOSE => {}
            c => cur.push(c),
        }
    }
    out.push((cur, in_user));
    out.retain(|(t, _)| !t.is_empty());
    out
}

/// Whether a key's value is the user's text: every key but `role` and `type`, whose values
/// templates compare against their own words.
fn is_user_text_key(key: &str) -> bool {
    key != "role" && key != "type"
}

/// Whether any string in `value` other than a `role` or `type` satisfies `f`.
pub fn any_user_text(value: &serde_json::Value, f: &dyn Fn(&str) -> bool) -> bool {
    use serde_json::Value as J;
    match value {
        J::String(s) => f(s),
        J::Array(items) => items.iter().any(|v| any_user_text(v, f)),
        J::Object(map) => map
            .iter()
            .any(|(k, v)| is_user_text_key(k) && any_user_text(v, f)),
        _ => false,
    }
}

/// What a chat template renders.
pub struct ChatInput<'a> {
    pub messages: &'a [serde_json::Value],
    pub tools: Option<&'a [serde_json::Value]>,
    pub add_generation_prompt: bool,
    pub kwargs: &'a serde_json::Map<String, serde_json::Value>,
}

/// The environment transformers renders chat templates in, as minijinja: `trim_blocks` and
/// `lstrip_blocks`, Python's string and dict methods (`split`, `get`, `items`, ...), a
/// `tojson` that writes what Python's `json.dumps` writes (no HTML escaping, `", "` and
/// `": "` separators, key order kept), and `raise_exception`.
fn template_environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<(), minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`.
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("tojson: {e}"),
        )
    })?;
    let mut out = String::new();
    python_json(
        &json,
        indent,
        sort_keys.unwrap_or(false),
        ensure_ascii.unwrap_or(false),
        0,
        &mut out,
    );
    Ok(out)
}

fn python_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    sort_keys: bool,
    ascii: bool,
    depth: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&python_number(n)),
        J::String(s) => python_string(s, ascii, out),
        J::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_json(item, indent, sort_keys, ascii, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &J)> = map.iter().collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_string(k, ascii, out);
                out.push_str(": ");
                python_json(item, indent, sort_keys, ascii, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

/// A JSON string as Python writes it: `"` `\\` and control characters escaped (`\n`, `\u001b`),
/// and with `ascii` every non-ASCII character as `\uXXXX` (surrogate pairs above U+FFFF).
fn python_string(s: &str, ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A number as Python's `repr` writes it: integers as they are, floats with a `.0` or an
/// exponent of at least two digits with its sign (`1e+16`, `1e-05`).
fn python_number(n: &serde_json::Number) -> String {
    let s = n.to_string();
    if !n.is_f64() {
        return s;
    }
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp.trim_start_matches('+')),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_writes_what_python_writes() {
        let v = serde_json::json!({"b": [1, 2.5, null, true], "a": {"x": "é\"\n<&>"}, "e": {}, "f": 1e20});
        let mut out = String::new();
        python_json(&v, None, false, false, 0, &mut out);
        assert_eq!(
            out,
            r#"{"b": [1, 2.5, null, true], "a": {"x": "é\"\n<&>"}, "e": {}, "f": 1e+20}"#
        );
        let mut out = String::new();
        python_json(
            &serde_json::json!({"k": ["é", 1]}),
            Some(2),
            true,
            true,
            0,
            &mut out,
        );
        assert_eq!(out, "{\n  \"k\": [\n    \"\\u00e9\",\n    1\n  ]\n}");
    }
}
