"""Load test for `moehost serve`: N concurrent streaming clients for D seconds, no errors
allowed; prints aggregate tokens/s next to a single-stream run measured first, and the ratio.

    cargo run --release -- serve &
    python3 examples/load_test.py [--url http://127.0.0.1:8080] [--clients 32] [--seconds 60]

Standard library only. Generated tokens are counted by the server (`/metrics`), so the figure
does not depend on how the client splits the stream.
"""
import argparse
import http.client
import json
import threading
import time
import urllib.parse

parser = argparse.ArgumentParser()
parser.add_argument("--url", default="http://127.0.0.1:8080")
parser.add_argument("--clients", type=int, default=32)
parser.add_argument("--seconds", type=float, default=60)
parser.add_argument("--single-seconds", type=float, default=15)
parser.add_argument("--max-tokens", type=int, default=128)
args = parser.parse_args()
url = urllib.parse.urlparse(args.url)


def completion_tokens_total():
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    for line in text.splitlines():
        if line.startswith("moehost_completion_tokens_total "):
            return float(line.split()[1])
    raise RuntimeError("no completion token counter in /metrics")


def one_request(i, errors):
    body = json.dumps({
        "prompt": f"<|bos|>Client {i} asks about the standard library:",
        "max_tokens": args.max_tokens,
        "temperature": 0.8,
        "seed": i,
        "stream": True,
    })
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        errors.append(f"HTTP {r.status}: {r.read()[:200]!r}")
        return
    # Read the whole stream at once: the client must cost little CPU next to the server.
    data = r.read()
    done = data.rstrip().endswith(b"data: [DONE]")
    if b'"error":{' in data:  # an error event; generated text is JSON-escaped, so no false hit
        errors.append(data[data.index(b'"error":{'):][:200].decode(errors="replace"))
    if not done:
        errors.append("stream ended without [DONE]")


def run(clients, seconds):
    errors, requests = [], [0]
    deadline = time.time() + seconds
    start_tokens = completion_tokens_total()
    t0 = time.time()

    def client(i):
        n = 0
        while time.time() < deadline:
            one_request(i * 100000 + n, errors)
            n += 1
        requests[0] += n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    tokens = completion_tokens_total() - start_tokens
    return tokens / elapsed, requests[0], errors


single, n1, e1 = run(1, args.single_seconds)
print(f"single stream: {single:.0f} tokens/s ({n1} requests, {len(e1)} errors)")
multi, n2, e2 = run(args.clients, args.seconds)
print(f"{args.clients} clients:    {multi:.0f} tokens/s ({n2} requests, {len(e2)} errors)")
print(f"batching speed-up: {multi / single:.1f}x")
for e in (e1 + e2)[:5]:
    print("error:", e)
if e1 or e2:
    raise SystemExit(1)
