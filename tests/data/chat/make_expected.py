#!/usr/bin/env python3
"""What transformers renders for published chat templates: the truth moehost's chat templates match.

    pip install transformers jinja2
    python3 tests/data/chat/make_expected.py

The templates (*.jinja) are public copies of the models' own: Kimi-K2-Instruct's first release
(kimi-k2), Kimi-K2-Thinking's (macros, break, namespace, dict.get, tojson), DeepSeek-V3's (its tokenizer_config.json
chat_template, as the deepseek-v3:671b GGUF embeds it: tool calls when content is none),
DeepSeek-V3.1's
(thinking kwarg, str.split) and DeepSeek-R1's (its tokenizer_config.json chat_template). Each
conversation below is rendered with transformers' own renderer (render_jinja_template: jinja2
sandbox, trim_blocks, lstrip_blocks, its tojson and raise_exception) with the model's bos/eos;
a conversation a template cannot render (e.g. DeepSeek's string concatenation of array content)
is left out for that template. Writes expected.json: [{template, case, messages, tools,
add_generation_prompt, kwargs, text}].
"""
import json
import os

import transformers
from transformers.utils.chat_template_utils import render_jinja_template

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL = {
    "kimi": {"bos_token": "[BOS]", "eos_token": "[EOS]"},
    "deepseek": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
}
TEMPLATES = {
    "kimi-k2.jinja": "kimi",
    "kimi-k2-thinking.jinja": "kimi",
    "deepseek-v3.jinja": "deepseek",
    "deepseek-v3.1.jinja": "deepseek",
    "deepseek-r1.jinja": "deepseek",
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city. Answers \"sunny\" or \"rain\" — & more <maybe>.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. 北京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
CALL = {"id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}
CALL2 = {"id": "functions.search:1", "type": "function",
         "function": {"name": "search", "arguments": "{\"q\": \"Louvre hours\"}"}}
CASES = [
    ("one-user", [{"role": "user", "content": "Hello! 你好"}], None, True, {}),
    ("system-multi-turn", [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nTwo lines."},
    ], None, True, {}),
    ("no-generation-prompt", [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ], None, False, {}),
    ("tools-declared", [{"role": "user", "content": "Weather in Paris?"}], [WEATHER, SEARCH], True, {}),
    ("tool-round-trip", [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris, and when is the Louvre open?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, CALL2]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "{\"weather\": \"sunny\", \"c\": 21}"},
        {"role": "tool", "tool_call_id": "functions.search:1", "content": "9:00-18:00"},
        {"role": "assistant", "content": "Sunny, 21 °C; the Louvre opens 9:00-18:00."},
        {"role": "user", "content": "Thanks!"},
    ], [WEATHER, SEARCH], True, {}),
    ("tool-call-with-content", [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "rain"},
    ], [WEATHER], True, {}),
    ("reasoning", [
        {"role": "user", "content": "Is 91 prime?"},
        {"role": "assistant", "reasoning_content": "91 = 7 * 13.", "content": "<think>91 = 7 * 13.</think>No: 7 × 13."},
        {"role": "user", "content": "And 97?"},
    ], None, True, {}),
    ("thinking-on", [{"role": "user", "content": "Think first."}], None, True, {"thinking": True}),
    ("content-parts", [
        {"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]},
    ], None, True, {}),
    ("named-user", [{"role": "user", "name": "alice", "content": "hi"}], None, True, {}),
]


def main():
    out = []
    for name, family in TEMPLATES.items():
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            template = f.read()
        for case, messages, tools, gen, kwargs in CASES:
            try:
                text = render_jinja_template(
                    conversations=[messages], tools=tools, chat_template=template,
                    add_generation_prompt=gen, **SPECIAL[family], **kwargs)[0][0]
            except Exception as e:  # noqa: BLE001 - the template cannot render this conversation
                print(f"{name} {case}: not rendered ({type(e).__name__}: {e})")
                continue
            out.append({"template": name, "case": case, "messages": messages, "tools": tools,
                        "add_generation_prompt": gen, "kwargs": {**SPECIAL[family], **kwargs}, "text": text})
    with open(os.path.join(HERE, "expected.json"), "w", encoding="utf-8") as f:
        json.dump({"transformers": transformers.__version__, "renders": out}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"{len(out)} renders")


if __name__ == "__main__":
    main()
