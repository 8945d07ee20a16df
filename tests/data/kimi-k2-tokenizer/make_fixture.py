#!/usr/bin/env python3
"""A Kimi-K2-layout tokenizer folder made with the real `tiktoken` package, and the ids tiktoken
gives for a set of texts: the fixture moehost's own tiktoken reader is tested against.

    pip install tiktoken regex
    python3 tests/data/kimi-k2-tokenizer/make_fixture.py

Writes, next to this script:
  tiktoken.model          `base64(token) rank` per line, as Kimi-K2 ships it (1,024 ranks trained here
                          with tiktoken's own trainer, instead of K2's 163,584)
  tokenizer_config.json   Kimi-K2's special tokens at the same offsets after the ranks (K2: 163,584 + offset)
                          (the chat template is tests/data/chat/kimi-k2-thinking.jinja)
  expected.json           [{"text", "ids"}]: tiktoken.Encoding(pat_str=K2's, specials).encode(text, allowed_special="all");
                          the last text is `chat` with `tools` rendered by Kimi-K2-Thinking's template, as
                          transformers renders it
"""
import base64
import json
import os

import tiktoken
from tiktoken._educational import bpe_train
from tiktoken.load import load_tiktoken_bpe

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..", "..")
VOCAB = 1024

# tokenization_kimi.py's pat_str.
KIMI_PAT = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
# Only for training the ranks (Python's `regex` has no `&&` outside V1 mode); the encoding splits with KIMI_PAT.
TRAIN_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Kimi-K2's named special tokens: offset after the last rank (163,584 in K2).
K2_SPECIALS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11, "<|tool_calls_section_end|>": 12, "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14, "<|tool_call_end|>": 15, "<|im_middle|>": 17,
    "[UNK]": 254, "[PAD]": 255,
}
RESERVED = 256

# A tool conversation through Kimi-K2-Thinking's published chat template (tests/data/chat), rendered as
# transformers renders it: the last expected text.
CHAT_TEMPLATE = os.path.join(HERE, "..", "chat", "kimi-k2-thinking.jinja")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CHAT = [
    {"role": "user", "content": [{"type": "text", "text": "What is 2+2? "}, {"type": "text", "text": "今天天气很好。 🙂"}]},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
     "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
]

CHINESE = "今天天气很好，我们去公园散步吧。人工智能正在改变世界，大模型的推理需要很多显存。中文分词和英文不同。"
CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
TEXTS = [
    "Hello, world! This is Kimi-K2.",
    "I'M sure they'll say it's fine; WE'VE done it, haven't we?",
    CHINESE,
    "混合 mixed 文本 with English 和中文, 2026年12月7日.",
    CODE,
    "for (int i = 0; i < 10; ++i) { sum += a[i] * b[i]; }\r\n\treturn sum;",
    "Numbers: 1234567890 3.14159 -42 1,000,000 0x1F",
    "spaces:  two   three    four\n\n\nnewlines\r\n\r\ncrlf \t tab\u3000ideographic space  ",
    "emoji 🙂🚀👍🏽 and flags 🇫🇷 plus ZWJ 👩‍💻",
    "<|im_system|>system<|im_middle|>You are Kimi.<|im_end|><|im_user|>user<|im_middle|>Hi!<|im_end|><|im_assistant|>assistant<|im_middle|>",
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"北京\"}<|tool_call_end|><|tool_calls_section_end|>",
    "[BOS]text[EOS] and a reserved <|reserved_token_1100|> token (ids 1024 + 76), <|reserved_token_1300|> (out of range: text); not special: <|im_end |> <|nope|>",
    "Ünïcödé àccents, Ελληνικά, кириллица, العربية, हिन्दी, 日本語のテキスト, 한국어.",
    "",
]


def training_text():
    parts = []
    for name in ("calibration.txt", "heldout.txt"):
        with open(os.path.join(ROOT, "tests", "data", "text", name), encoding="utf-8") as f:
            parts.append(f.read()[:20000])
    parts += [CHINESE * 20, CODE * 20]
    return "\n".join(parts)


def main():
    ranks = bpe_train(training_text(), VOCAB, TRAIN_PAT, visualise=None)
    assert len(ranks) == VOCAB and sorted(ranks.values()) == list(range(VOCAB))
    n = len(ranks)
    names = {n + off: name for name, off in K2_SPECIALS.items()}
    specials = {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(n, n + RESERVED)}
    enc = tiktoken.Encoding("kimi-k2-fixture", pat_str=KIMI_PAT, mergeable_ranks=ranks, special_tokens=specials)

    path = os.path.join(HERE, "tiktoken.model")
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    assert load_tiktoken_bpe(path) == ranks

    added = {
        str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, name in sorted(names.items())
    }
    config = {
        "added_tokens_decoder": added,
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1048576,
        "tokenizer_class": "TikTokenTokenizer",
    }
    with open(os.path.join(HERE, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")

    from transformers.utils.chat_template_utils import render_jinja_template
    with open(CHAT_TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    chat_prompt = render_jinja_template(conversations=[CHAT], tools=TOOLS, chat_template=template,
                                        add_generation_prompt=True, bos_token="[BOS]", eos_token="[EOS]")[0][0]
    expected = []
    for t in TEXTS + [chat_prompt]:
        ids = enc.encode(t, allowed_special="all")
        assert enc.decode(ids) == t
        expected.append({"text": t, "ids": ids})
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        f.write(f'{{"tiktoken": "{tiktoken.__version__}", "ranks": {n}, "chat": {json.dumps(CHAT, ensure_ascii=False)}, "tools": {json.dumps(TOOLS, ensure_ascii=False)}, '
                f'"cases": [\n')
        f.write(",\n".join(json.dumps(e, ensure_ascii=False) for e in expected))
        f.write("\n]}\n")
    with open(os.path.join(HERE, "expected.json")) as f:
        assert json.load(f)["cases"] == expected
    print(f"{n} ranks, {len(specials)} specials, {len(expected)} texts, "
          f"{sum(len(e['ids']) for e in expected)} ids")


if __name__ == "__main__":
    main()
