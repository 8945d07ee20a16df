//! Published chat templates (Kimi-K2, Kimi-K2-Thinking, DeepSeek-V3, DeepSeek-V3.1, DeepSeek-R1) render
//! byte for byte what transformers' `apply_chat_template` renders, for multi-turn, tool and
//! reasoning conversations (tests/data/chat, made by its script with transformers).

mod support;

use moehost::chat::{ChatInput, ChatTemplate};
use serde_json::Value;

fn template(
    name: &str,
    kwargs: &serde_json::Map<String, Value>,
) -> (tempfile::TempDir, ChatTemplate) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        support::data_dir().join("chat").join(name),
        dir.path().join("chat_template.jinja"),
    )
    .unwrap();
    let config =
        serde_json::json!({"bos_token": kwargs["bos_token"], "eos_token": kwargs["eos_token"]});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let t = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
    (dir, t)
}

#[test]
fn published_templates_render_as_transformers_does() {
    let expected: Value = serde_json::from_slice(
        &std::fs::read(support::data_dir().join("chat/expected.json")).unwrap(),
    )
    .unwrap();
    let renders = expected["renders"].as_array().unwrap();
    assert!(renders.len() >= 30);
    let mut templates = std::collections::BTreeSet::new();
    for r in renders {
        let name = r["template"].as_str().unwrap();
        templates.insert(name);
        let mut kwargs = r["kwargs"].as_object().unwrap().clone();
        let (_dir, t) = template(name, &kwargs);
        kwargs.remove("bos_token");
        kwargs.remove("eos_token");
        let tools = r["tools"].as_array().map(|v| v.as_slice());
        let got = t
            .render_chat(&ChatInput {
                messages: r["messages"].as_array().unwrap(),
                tools,
                add_generation_prompt: r["add_generation_prompt"].as_bool().unwrap(),
                kwargs: &kwargs,
            })
            .unwrap_or_else(|e| panic!("{name} {}: {e:#}", r["case"]));
        assert_eq!(got, r["text"].as_str().unwrap(), "{name} {}", r["case"]);
    }
    assert_eq!(templates.len(), 5);
}

/// Each family's tool-call parser reads back, from the prompt its own template rendered, the
/// calls the conversation's assistant turns made: the syntax the model is trained to write.
#[test]
fn tool_call_parsers_read_what_the_templates_write() {
    use moehost::server::tools::{parse, ToolParser};
    let expected: Value = serde_json::from_slice(
        &std::fs::read(support::data_dir().join("chat/expected.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for r in expected["renders"].as_array().unwrap() {
        let parser = match r["template"].as_str().unwrap() {
            "kimi-k2-thinking.jinja" => ToolParser::KimiK2,
            "deepseek-r1.jinja" => ToolParser::DeepSeekV3,
            "deepseek-v3.1.jinja" => ToolParser::DeepSeekV31,
            // Kimi-K2's first template does not write calls back; DeepSeek-V3's writes them only
            // when the content is null, and closes the section only after a second call.
            _ => continue,
        };
        let want: Vec<&Value> = r["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["tool_calls"].as_array())
            .flatten()
            .collect();
        if want.is_empty() {
            continue;
        }
        let (_, calls) = parse(parser, r["text"].as_str().unwrap(), "call");
        assert_eq!(calls.len(), want.len(), "{} {}", r["template"], r["case"]);
        for (got, want) in calls.iter().zip(want) {
            assert_eq!(got.name, want["function"]["name"].as_str().unwrap());
            assert_eq!(
                got.arguments,
                want["function"]["arguments"].as_str().unwrap()
            );
            if parser == ToolParser::KimiK2 {
                assert_eq!(got.id, want["id"].as_str().unwrap());
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 6);
}

#[test]
fn the_parser_is_found_from_the_tokenizer() {
    use moehost::server::tools::ToolParser;
    use moehost::tokenizer::Tokenizer;
    let kimi = Tokenizer::from_dir(&support::kimi_tokenizer_dir()).unwrap();
    assert_eq!(ToolParser::detect(&kimi, None), Some(ToolParser::KimiK2));
    let tiny = Tokenizer::from_dir(&support::bf16_model()).unwrap();
    assert_eq!(ToolParser::detect(&tiny, None), None);
    assert_eq!(
        ToolParser::parse_name("deepseek_v31"),
        Some(ToolParser::DeepSeekV31)
    );
}
