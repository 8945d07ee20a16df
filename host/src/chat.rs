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
        let mut env = minijinja::Environment::new();
        env.add_template_owned("chat", template)
            .with_context(|| format!("{source} does not parse"))?;
        Ok(Some(Self {
            env,
            bos: token("bos_token"),
            eos: token("eos_token"),
            source,
        }))
    }

    /// The prompt text of `messages` (role, content), with the generation prompt.
    pub fn render(&self, messages: &[(&str, &str)]) -> Result<String, minijinja::Error> {
        let msgs: Vec<_> = messages
            .iter()
            .map(|(role, content)| minijinja::context! { role => role, content => content })
            .collect();
        let tmpl = self.env.get_template("chat")?;
        tmpl.render(minijinja::context! {
            messages => msgs, bos_token => self.bos, eos_token => self.eos, add_generation_prompt => true
        })
    }
}
