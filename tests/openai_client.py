"""The agent path over real HTTP with the official `openai` client (run by tests/server.rs's
`the_official_openai_client_drives_tools_json_and_logprobs` against a server it starts; or by
hand against `moehost serve`):

    python3 tests/openai_client.py http://127.0.0.1:8080/v1 [MOEHOST_BINARY]

Checks: a named tool_choice returns a call whose arguments validate against the tool's schema;
the tool's result sent back continues the conversation; streaming gives the same call; a
json_schema answer validates; chat logprobs are the log-softmax of `moehost forward`'s logits
(when the binary is given). Prints one line per check; exits non-zero on the first failure.
"""
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

import urllib.request

from openai import OpenAI

base_url = sys.argv[1]
binary = sys.argv[2] if len(sys.argv) > 2 else None
client = OpenAI(base_url=base_url, api_key="unused")
model = client.models.list().data[0].id

LEVEL = {
    "type": "object",
    "properties": {
        "level": {"type": "integer", "minimum": 0, "maximum": 9},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["level", "unit"],
    "additionalProperties": False,
}
tools = [{"type": "function", "function": {"name": "set_level", "description": "Set the level.", "parameters": LEVEL}}]


def check_level(args):
    assert set(args) == {"level", "unit"}, args
    assert args["level"] == int(args["level"]) and 0 <= args["level"] <= 9, args
    assert args["unit"] in ("c", "f"), args


messages = [{"role": "user", "content": "Set the level to 3 celsius."}]
choice = {"type": "function", "function": {"name": "set_level"}}
r = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice=choice,
                                   max_tokens=60, temperature=0)
msg = r.choices[0].message
assert r.choices[0].finish_reason == "tool_calls", r
assert len(msg.tool_calls) == 1, msg
call = msg.tool_calls[0]
assert call.function.name == "set_level", call
check_level(json.loads(call.function.arguments))
print("named tool_choice:", call.function.name, call.function.arguments)

# Streamed: the same call, assembled from delta.tool_calls.
parts = {}
for chunk in client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice=choice,
                                            max_tokens=60, temperature=0, stream=True):
    for tc in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
        p = parts.setdefault(tc.index, {"name": "", "arguments": ""})
        if tc.function.name:
            p["name"] += tc.function.name
        if tc.function.arguments:
            p["arguments"] += tc.function.arguments
assert parts == {0: {"name": call.function.name, "arguments": call.function.arguments}}, parts
print("streamed tool call: same")

# The tool's result goes back; the conversation continues.
messages += [
    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": True})},
]
r2 = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=16, temperature=0)
assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls"), r2
assert r2.usage.prompt_tokens > r.usage.prompt_tokens, (r2.usage, r.usage)
print("after the tool result:", repr(r2.choices[0].message.content), r2.choices[0].finish_reason)

# Structured output.
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
r3 = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Describe someone."}], max_tokens=80, temperature=0,
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
person = json.loads(r3.choices[0].message.content)
assert set(person) == {"name", "age"} and len(person["name"]) <= 8 and 0 <= person["age"] <= 120, person
print("json_schema:", person)

# Logprobs against `moehost forward`: the first token's logprob and its alternatives are the
# largest log-softmax values of the logits after the prompt (greedy decoding).
if binary:
    root = base_url.rsplit("/v1", 1)[0]
    req = urllib.request.Request(root + "/tokenize", data=json.dumps({"prompt": "The quick brown fox"}).encode(),
                                 headers={"Content-Type": "application/json"})
    prompt_ids = json.load(urllib.request.urlopen(req))["tokens"]
    r4 = client.completions.create(model=model, prompt=prompt_ids, max_tokens=4, temperature=0, logprobs=2)
    lp = r4.choices[0].logprobs
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "f.safetensors")
        subprocess.run([binary, "forward", "--ids", ",".join(map(str, prompt_ids)), "--out", out],
                       check=True, capture_output=True)
        raw = open(out, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(raw[8:8 + n])["logits"]
    assert meta["dtype"] == "F32", meta
    rows, vocab = meta["shape"]
    start, end = meta["data_offsets"]
    row = struct.unpack(f"<{vocab}f", raw[8 + n + start + (rows - 1) * vocab * 4:8 + n + start + rows * vocab * 4])
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    best = sorted((x - lse for x in row), reverse=True)[:2]
    assert abs(lp.token_logprobs[0] - best[0]) < 1e-3, (lp.token_logprobs[0], best)
    alternatives = sorted(lp.top_logprobs[0].values(), reverse=True)
    assert all(abs(a - b) < 1e-3 for a, b in zip(alternatives, best)), (alternatives, best)
    print("logprobs match moehost forward:", round(lp.token_logprobs[0], 4), [round(b, 4) for b in best])
print("ok")
