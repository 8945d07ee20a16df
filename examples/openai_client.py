"""Talk to `moehost serve` with the official OpenAI Python client.

    cargo run --release -- serve &          # the bundled model on 127.0.0.1:8080
    pip install openai
    python3 examples/openai_client.py [--base-url http://127.0.0.1:8080/v1]
"""
import argparse

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
args = parser.parse_args()

# moehost needs no API key for inference; the client insists on one being set.
client = OpenAI(base_url=args.base_url, api_key="unused")

model = client.models.list().data[0].id
print("model:", model)

done = client.completions.create(model=model, prompt="<|bos|>The quick brown fox", max_tokens=24, temperature=0)
print("completion:", repr(done.choices[0].text), done.usage)

chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Tell me a fortune."}],
    max_tokens=24,
    temperature=0,
)
print("chat:", repr(chat.choices[0].message.content), chat.choices[0].finish_reason)

print("stream: ", end="")
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write some Python."}],
    max_tokens=32,
    temperature=0.8,
    seed=7,
    stream=True,
):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
