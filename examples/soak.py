"""Soak test for `moehost serve`: well-behaved streaming clients, a policy hot swap every
--swap-every seconds, and, in alternate phases, one hostile client (huge prompts, too many
stop strings, slowloris connections). Reports, per phase kind, the well-behaved clients'
failed requests and inter-token latency percentiles, and the ratio hostile/calm of the p99.

    cargo run --release -- serve --admin-token soak --header-timeout 10 &
    python3 examples/soak.py [--url http://127.0.0.1:8080] [--clients 32] [--minutes 10]

Phases alternate calm, hostile, calm, hostile, ... (four by default), so the two kinds share
the machine's drift. Standard library only. Exits 1 when a well-behaved request failed or a
bundled policy was quarantined.
"""
import argparse
import http.client
import json
import socket
import threading
import time
import urllib.parse

parser = argparse.ArgumentParser()
parser.add_argument("--url", default="http://127.0.0.1:8080")
parser.add_argument("--clients", type=int, default=32)
parser.add_argument("--minutes", type=float, default=10)
parser.add_argument("--phases", type=int, default=4)
parser.add_argument("--swap-every", type=float, default=30)
parser.add_argument("--admin-token", default="soak")
parser.add_argument("--max-tokens", type=int, default=64)
args = parser.parse_args()
url = urllib.parse.urlparse(args.url)

stop_all = threading.Event()
hostile_on = threading.Event()
phase_lock = threading.Lock()
phase = {"name": "calm", "index": 0}
# phase index -> {"gaps": [...], "ok": n, "failed": [...]}
results = {}


def record(kind, value):
    with phase_lock:
        r = results.setdefault(phase["index"], {"kind": phase["name"], "gaps": [], "ok": 0, "failed": []})
        if kind == "gaps":
            r["gaps"].extend(value)
        elif kind == "ok":
            r["ok"] += 1
        else:
            r["failed"].append(value)


def well_behaved(i):
    n = 0
    while not stop_all.is_set():
        n += 1
        body = json.dumps({
            "prompt": f"<|bos|>Client {i} request {n} asks about the library:",
            "max_tokens": args.max_tokens, "temperature": 0.8, "seed": i * 1000 + n, "stream": True,
        })
        try:
            c = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
            c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                record("failed", f"HTTP {r.status}: {r.read()[:200]!r}")
                continue
            last, gaps, done = None, [], False
            while True:
                line = r.readline()
                if not line:
                    break
                if line.startswith(b"data: [DONE]"):
                    done = True
                    break
                if line.startswith(b"data: "):
                    if b'"error":{' in line:
                        record("failed", line[:200].decode(errors="replace"))
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
            c.close()
            if done:
                record("gaps", gaps)
                record("ok", None)
            else:
                record("failed", "stream ended without [DONE]")
        except Exception as e:  # a failed request is what this test counts
            record("failed", repr(e))


def post(path, body, token=None, timeout=60):
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    c.request("POST", path, body, headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


hostile_counts = {"huge": 0, "stops": 0, "slowloris": 0}


def hostile_sender(kind, body, timeout):
    """Sends `body` to completions again and again while the hostile phase is on."""
    def run():
        while not stop_all.is_set():
            if not hostile_on.wait(0.5):
                continue
            try:
                post("/v1/completions", body, timeout=timeout)
                hostile_counts[kind] += 1
            except Exception:
                pass
    return run


# ~7 MB of prompt, under the 8 MiB body limit.
hostile_huge = hostile_sender("huge", json.dumps({"prompt": "the quick brown fox " * 350_000, "max_tokens": 1}), 300)
hostile_stops = hostile_sender(
    "stops", json.dumps({"prompt": "x", "max_tokens": 4, "stop": ["s%d" % i for i in range(600_000)]}), 120)


def hostile_slowloris():
    socks = []
    while not stop_all.is_set():
        if not hostile_on.wait(0.5):
            for s in socks:
                s.close()
            socks = []
            continue
        try:
            while len(socks) < 64:
                s = socket.create_connection((url.hostname, url.port), timeout=5)
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                socks.append(s)
                hostile_counts["slowloris"] += 1
            alive = []
            for s in socks:
                try:
                    s.sendall(b"X-a: b\r\n")
                    alive.append(s)
                except OSError:
                    s.close()  # the server closed it: the header timeout worked
            socks = alive
        except OSError:
            pass
        time.sleep(1)


def swapper():
    names = ["lfu", "layer-cycle", "lru"]
    k = 0
    while not stop_all.wait(args.swap_every):
        name = names[k % len(names)]
        k += 1
        try:
            status, data = post("/admin/policies/activate", json.dumps({"kind": "eviction", "name": name}),
                                token=args.admin_token)
            if status != 200:
                print(f"swap to {name}: HTTP {status} {data[:200]!r}")
        except Exception as e:
            print(f"swap to {name} failed: {e!r}")


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


threads = [threading.Thread(target=well_behaved, args=(i,), daemon=True) for i in range(args.clients)]
threads += [threading.Thread(target=f, daemon=True) for f in (hostile_huge, hostile_stops, hostile_slowloris, swapper)]
for t in threads:
    t.start()
per_phase = args.minutes * 60 / args.phases
for i in range(args.phases):
    with phase_lock:
        phase["index"] = i
        phase["name"] = "hostile" if i % 2 else "calm"
    if i % 2:
        hostile_on.set()
    else:
        hostile_on.clear()
    print(f"phase {i}: {phase['name']} for {per_phase:.0f} s", flush=True)
    time.sleep(per_phase)
stop_all.set()
hostile_on.clear()

c = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
c.request("GET", "/metrics")
metrics = c.getresponse().read().decode()
quarantined = [l for l in metrics.splitlines() if l.startswith("moehost_policy_quarantined{") and l.endswith(" 1")]

summary = {}
for kind in ("calm", "hostile"):
    gaps = [g for r in results.values() if r["kind"] == kind for g in r["gaps"]]
    failed = [f for r in results.values() if r["kind"] == kind for f in r["failed"]]
    ok = sum(r["ok"] for r in results.values() if r["kind"] == kind)
    summary[kind] = {
        "requests_ok": ok, "requests_failed": len(failed), "failures": failed[:5],
        "itl_p50_ms": pct(gaps, 50) * 1e3, "itl_p99_ms": pct(gaps, 99) * 1e3, "tokens": len(gaps),
    }
summary["p99_ratio_hostile_over_calm"] = summary["hostile"]["itl_p99_ms"] / summary["calm"]["itl_p99_ms"]
summary["hostile_attempts"] = hostile_counts
summary["quarantined"] = quarantined
print(json.dumps(summary, indent=2))
bad = summary["calm"]["requests_failed"] + summary["hostile"]["requests_failed"] > 0 or quarantined
raise SystemExit(1 if bad else 0)
