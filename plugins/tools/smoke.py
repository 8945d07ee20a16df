#!/usr/bin/env python3
"""Smoke-test every built guest the way the host loads it: wasmtime, an EMPTY linker (no WASI,
no functions), one store per plugin. Checks answers and that the fixtures misbehave as
intended. Build first:

    cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release
    pip install wasmtime numpy
    python3 plugins/tools/smoke.py
"""
import sys

import numpy as np

from wasm_policy import ACCESS, INSERT, REMOVE, Plugin, cap, codes, event, get, rec, resident_set, shape

L, E, K = 7, 64, 6
SHAPE = shape(L, E, K)
CAPS = [cap("device", 44), cap("host", 448)]
failures = []


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + (f" ({detail})" if detail and not cond else ""))
    if not cond:
        failures.append(name)


def host_top_k(row, k):
    """host/src/router.rs top_k_indices: score desc (NaN as -inf, IEEE total order), id asc."""
    key = [(-(-np.inf if np.isnan(x) else float(x)), i) for i, x in enumerate(row)]
    # total order: -0.0 ranks below +0.0
    key = [((kv, -np.copysign(1.0, row[i]) if kv == 0 else 0), i) for (kv, i) in key]
    return [i for _, i in sorted(key)[:k]]


def selection():
    p = Plugin("topk", "selection")
    info = p.call("init", SHAPE, CAPS, resident_set())
    check("topk init: max-score-gap 0", get(info, "max-score-gap") == 0.0)
    legacy = Plugin("legacy_v0_1", "selection", version="0.1.0")
    info = legacy.call("init", SHAPE, CAPS, [])
    check("legacy-v0.1 init: legacy-topk", get(get(info, "info"), "name") == "legacy-topk")
    rng = np.random.default_rng(1)
    ok = ok_legacy = True
    for t in range(50):
        tokens = 1 + t % 5
        s = (rng.integers(0, 8, tokens * E) / 8).astype(np.float32)  # many ties
        if t % 7 == 0:
            s[rng.integers(0, len(s), 5)] = np.nan
        out = p.call("select", 0, tokens, K, [float(x) for x in s], codes(["disk"] * E))
        want = sum((host_top_k(s[i * E : (i + 1) * E], K) for i in range(tokens)), [])
        ok &= out == want
        out = legacy.call("select", 0, tokens, K, [float(x) for x in s], ["disk"] * E)
        ok_legacy &= out == want
    check("topk select == host top-k (ties, NaN)", ok)
    check("legacy-v0.1 (moehost:policy@0.1.0) select == host top-k", ok_legacy)

    p = Plugin("cache_aware", "selection")
    info = p.call("init", SHAPE, CAPS, resident_set())
    gap = get(info, "max-score-gap")
    check("cache-aware init: max-score-gap 0.05", abs(gap - 0.05) < 1e-9, gap)
    ok, swapped = True, 0
    for t in range(100):
        tokens = 1 + t % 4
        s = rng.random(tokens * E).astype(np.float32)
        res = ["device" if r else "host" for r in rng.random(E) < 0.3]
        out = p.call("select", 1, tokens, K, [float(x) for x in s], codes(res))
        for i in range(tokens):
            row, got = s[i * E : (i + 1) * E], out[i * K : (i + 1) * K]
            exact = host_top_k(row, K)
            kth = row[exact[-1]]
            ok &= len(set(got)) == K and all(0 <= e < E for e in got)
            ok &= all(kth - row[e] <= gap for e in got)
            swapped += len(set(got) - set(exact))
            # every non-device expert kept means no device substitute was within the gap
    check("cache-aware: k distinct ids within the gap", ok)
    check("cache-aware: substitutes resident experts", swapped > 0, swapped)

    p = Plugin("bad_ids", "selection")
    info = p.call("init", SHAPE, CAPS, resident_set())
    out = p.call("select", 0, 3, K, [0.5] * (3 * E), codes(["device"] * E))
    check("bad-ids: out-of-range ids", len(out) == 3 * K and all(e == E + 7 for e in out), out)


def eviction():
    facts = lambda step, layer, evs: rec(step=step, layer=layer, events=evs)
    eid = lambda l, e: l * E + e
    access = lambda l, e: event(ACCESS, "device", eid(l, e))
    req = lambda n, excluded=(), tier="device", only_layer=None: rec(
        tier=tier, count=n, excluded=[eid(*k) for k in excluded], only_layer=only_layer
    )
    keys = lambda out: [divmod(e, E) for e in out]
    for name in ("lru", "lfu", "layer_cycle"):
        p = Plugin(name, "eviction")
        # device: (0,0) .. (0,3); host: (5,5)
        resident = resident_set([(eid(0, e), "device") for e in range(4)] + [(eid(5, 5), "host")])
        info = p.call("init", SHAPE, CAPS, resident)
        check(f"{name} init", get(info, "name") != "", vars(info))
        for step in range(5):
            for layer in range(L):
                evs = [access(layer, 1), access(layer, 2 + step % 2)]
                out = p.call("on-step", facts(step, layer, evs), None)
                assert out == []
        evs = [event(INSERT, "device", eid(0, 9)), event(INSERT, "device", eid(3, 1)),
               event(REMOVE, "device", eid(0, 3)), access(0, 1)]
        # device now: (0,0), (0,1), (0,2), (0,9), (3,1); (0,1) in use
        got = keys(p.call("on-step", facts(5, 0, evs), req(3, [(0, 1), (6, 6)])))
        allowed = {(0, 0), (0, 2), (0, 9), (3, 1)}
        check(f"{name} victims: 3 distinct residents, not excluded", len(set(got)) == 3 and set(got) <= allowed, got)
        got2 = keys(p.call("victims", req(10, [(0, 1)], only_layer=3)))
        check(f"{name} victims: only-layer", all(l == 3 for l, _ in got2) and (3, 1) not in got, (got, got2))
        got2 += keys(p.call("victims", req(10, [(0, 1)])))
        check(f"{name} victims: named victims are not named again", sorted(got + got2) == sorted(allowed), (got, got2))
        check(f"{name} victims: empty request", p.call("victims", req(0)) == [])
        got = keys(p.call("victims", req(5, tier="host")))
        check(f"{name} victims: host tier", got == [(5, 5)], got)
        check(f"{name} victims: out-of-range events ignored",
              p.call("on-step", facts(6, 0, [0xFFFF_FFFF, event(INSERT, "device", 1 << 27)]), req(1, [(0, 1)])) == [])
        p.call("init", SHAPE, CAPS, resident_set([(eid(6, 5), "device"), (eid(0, 1), "device")]))
        got = keys(p.call("victims", req(1)))
        check(f"{name} re-init: residency from init", got in ([(6, 5)], [(0, 1)]), got)

    for name, err in (("loop_forever", "fuel"), ("trap", "unreachable"), ("alloc_bomb", "")):
        p = Plugin(name, "eviction", fuel=200_000_000, memory=64 << 20)
        p.call("init", SHAPE, CAPS, resident_set())
        try:
            p.call("on-step", facts(0, 0, []), None)
            check(f"{name}: on-step fails", False, "returned")
        except Exception as e:  # wasmtime.WasmtimeError / Trap
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            msg = lines[-1] if lines else type(e).__name__
            check(f"{name}: on-step fails ({msg[:60]})", err in str(e) or not err, str(e)[:200])

    try:
        Plugin("wasi_import", "eviction")
        check("wasi-import refused by an empty linker", False, "instantiated")
    except Exception as e:
        check(f"wasi-import refused by an empty linker ({str(e).splitlines()[0][:70]})", True)


def prefetch():
    routed = lambda step, layer, tokens, exps, outlook: rec(
        step=step, layer=layer, tokens=tokens, experts=exps, outlook=outlook
    )
    p = Plugin("none", "prefetch")
    info = p.call("init", SHAPE, CAPS, resident_set())
    check("none: lookahead 0", get(info, "lookahead") == 0)
    check("none: no requests", p.call("on-routed", routed(0, 0, 1, [1, 2], [])) == [])

    p = Plugin("next_layer_gate", "prefetch")
    info = p.call("init", SHAPE, CAPS, resident_set())
    check("next-layer-gate: lookahead 1", get(info, "lookahead") == 1)
    s = np.zeros(2 * E, np.float32)
    s[[3, 4, 5, 6, 7, 8]] = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    s[E + np.array([3, 10, 11, 12, 13, 14])] = [0.95, 0.3, 0.3, 0.3, 0.3, 0.3]
    res = ["device" if e == 4 else "host" for e in range(E)]
    outlook = [rec(layer=2, scores=[float(x) for x in s], residency=codes(res))]
    out = p.call("on-routed", routed(0, 1, 2, [0, 1], outlook))
    got = [(*divmod(get(r, "expert"), E), get(r, "priority")) for r in out]
    exps = [e for _, e, _ in got]
    check("next-layer-gate: layer 2, deduplicated, resident skipped, best first",
          all(l == 2 for l, _, _ in got) and len(set(exps)) == len(exps) and 4 not in exps
          and exps[0] == 3 and got[0][2] == 950000 and len(exps) == 10, got)
    check("next-layer-gate: tier device", all(get(r, "tier") == "device" for r in out))
    check("next-layer-gate: last layer -> nothing", p.call("on-routed", routed(0, 6, 1, [1], [])) == [])

    p = Plugin("transitions", "prefetch")
    info = p.call("init", SHAPE, CAPS, resident_set())
    check("transitions: lookahead 0", get(info, "lookahead") == 0)
    for step in range(6):
        for layer in range(L):
            out = p.call("on-routed", routed(step, layer, 1, [layer, layer + 10], []))
    got = [divmod(get(r, "expert"), E) for r in out]
    check("transitions: last layer predicts layer 0 of the next step", sorted(got) == [(0, 0), (0, 10)], got)
    out = p.call("on-routed", routed(6, 0, 1, [0, 10], []))
    got = [divmod(get(r, "expert"), E) for r in out]
    check("transitions: learned path", sorted(got) == [(1, 1), (1, 11)], got)


if __name__ == "__main__":
    selection()
    eviction()
    prefetch()
    print(f"{len(failures)} failed" if failures else "all smoke checks passed")
    sys.exit(1 if failures else 0)
