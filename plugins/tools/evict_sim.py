#!/usr/bin/env python3
"""Replay a moehost-format routing trace against cache-eviction policies (Python models of the
eviction guests in plugins/: lru, lfu, layer-cycle) and Belady's optimal bound.

Replay semantics (the replay-lab issue's): for each forward step, for each MoE layer in order,
the distinct experts routed at that (step, layer), in ascending id, are the accesses. One global
pool of C experts (out of layers x experts). The current (step, layer)'s experts are pinned.
A miss inserts the expert, evicting by the policy when the pool is full. Like the host, the
policy sees the layer step's access events first, then one victim request for the room the
misses need (candidates: the unpinned residents), then the insert events.
Hit rate = hits / accesses.

    python3 plugins/tools/evict_sim.py [TRACE] [--tune] [--lfu] [--wasm]
needs: pip install numpy safetensors (and wasmtime for --wasm, which replays the built guests
lru.wasm, lfu.wasm and layer_cycle.wasm themselves through their WIT interface, 0.2.0).
"""
import bisect
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

DEFAULT = "/work/shared/traces/tiny-k2/moehost-format/decode-batch1.safetensors"


def load_visits(path):
    d = load_file(path)
    with safe_open(path, "np") as f:
        meta = f.metadata()
    E = int(meta["n_routed_experts"])
    K = int(meta["k"])
    ex, st = d["experts"], d["step"]
    L = ex.shape[1]
    visits = []  # (step, layer, sorted distinct experts)
    steps, starts = np.unique(st, return_index=True)
    bounds = list(starts) + [len(st)]
    for i, s in enumerate(steps):
        rows = ex[bounds[i] : bounds[i + 1]]
        for layer in range(L):
            visits.append((int(s), layer, sorted(set(rows[:, layer, :].ravel().tolist()))))
    return visits, L, E, K


class Policy:
    def on_step(self, step, layer, accesses):
        """`accesses`: the (layer, expert) keys the layer step uses, ascending."""

    def on_insert(self, key):
        pass

    def victims(self, cands, count):
        raise NotImplementedError

    def end_step(self):
        pass


class Wasm(Policy):
    """A built eviction guest, driven as the host drives it (moehost:policy@0.2.0): one on-step
    call per layer step with the packed events since the previous call (the previous step's
    removes and inserts first, then the step's accesses) and the victim request, if any: the
    device tier, excluding the step's experts (the guest knows the residents from the events)."""

    def __init__(self, name, L, E, K, C):
        from wasm_policy import ACCESS, INSERT, REMOVE, Plugin, cap, event, rec, resident_set, shape

        self.rec, self.E = rec, E
        self.ev = lambda kind, key: event(kind, "device", key[0] * E + key[1])
        self.kinds = ACCESS, INSERT, REMOVE
        self.p = Plugin(name, "eviction")
        self.p.call("init", shape(L, E, K), [cap("device", C), cap("host", L * E)], resident_set())
        self.events = []
        self.facts = None
        self.pinned = []

    def on_step(self, step, layer, accesses):
        self.events += [self.ev(self.kinds[0], k) for k in accesses]
        self.facts = self.rec(step=step, layer=layer, events=self.events)
        self.events = []
        self.pinned = [k[0] * self.E + k[1] for k in accesses]

    def on_insert(self, key):
        self.events.append(self.ev(self.kinds[1], key))

    def victims(self, cands, count):
        req = self.rec(tier="device", count=count, excluded=self.pinned, only_layer=None)
        out = self.p.call("on-step", self.facts, req)
        self.facts = None
        got = [divmod(e, self.E) for e in out]
        self.events += [self.ev(self.kinds[2], k) for k in got]
        return got

    def end_step(self):
        if self.facts is not None:
            assert self.p.call("on-step", self.facts, None) == []
            self.facts = None


class LRU(Policy):
    """plugins/lru: least recently accessed or inserted."""

    def __init__(self, L, E, K, C):
        self.t = 0
        self.stamp = {}

    def touch(self, key):
        self.t += 1
        self.stamp[key] = self.t

    def on_step(self, step, layer, accesses):
        for k in accesses:
            self.touch(k)

    def on_insert(self, key):
        self.touch(key)

    def victims(self, cands, count):
        return sorted(cands, key=lambda k: (self.stamp.get(k, 0), k))[:count]


class LFU(Policy):
    """plugins/lfu: access counts, all halved every `period` accesses (lazily, by epoch);
    ties -> least recently used."""

    def __init__(self, L, E, K, C, period=None):
        self.period = period or 4 * max(C, 1)
        self.n = self.epoch = self.t = 0
        self.cnt, self.ep, self.stamp = {}, {}, {}

    def count(self, key):
        return self.cnt.get(key, 0) >> min(31, self.epoch - self.ep.get(key, 0))

    def on_step(self, step, layer, accesses):
        for key in accesses:
            self.cnt[key] = self.count(key) + 1
            self.ep[key] = self.epoch
            self.t += 1
            self.stamp[key] = self.t
            self.n += 1
            if self.n % self.period == 0:
                self.epoch += 1

    def on_insert(self, key):
        self.t += 1
        self.stamp[key] = self.t

    def victims(self, cands, count):
        return sorted(cands, key=lambda k: (self.count(k), self.stamp.get(k, 0), k))[:count]


class Quick(Policy):
    """The notes' quick policy: p = decayed per-visit usage rate (decay 0.9 per visit of the
    layer), next use = distance until the layer comes round + layers x (1/p - 1)."""

    def __init__(self, L, E, K, C, decay=0.9):
        self.L, self.d = L, decay
        self.visit = [0] * L
        self.p = {}
        self.cur = 0

    def on_step(self, step, layer, accesses):
        self.cur = layer
        self.visit[layer] += 1
        v = self.visit[layer]
        for key in accesses:
            p, last = self.p.get(key, (0.0, 0))
            self.p[key] = (p * self.d ** (v - last) + (1 - self.d), v)

    def est(self, key):
        p, last = self.p.get(key, (0.0, 0))
        p = max(p * self.d ** (self.visit[key[0]] - last), 1e-6)
        return (key[0] - self.cur - 1) % self.L + 1 + self.L * (1.0 / p - 1.0)

    def victims(self, cands, count):
        return sorted(cands, key=lambda k: (-self.est(k), k))[:count]


class LayerCycle(Policy):
    """plugins/layer-cycle, step for step (see its README for the reasoning).

    Per layer: visit counter, running mean of a visit's distinct experts (a visit with more
    than BURST x that mean, e.g. a prefill, starts a new context: usage rates restart), and for
    every lag P = 1..H the decayed precision q[P] of "the experts used P visits ago are used
    again now" (greedy decode and repetitive text loop with a period).
    Per expert: decayed per-visit usage rate p (bias-corrected since the context start) and the
    bit history of its last 32 visits.
    Next use, in layer steps: with the layer's best lag P* (precision qb), the loop predicts the
    expert at the first of the next P* visits that repeats a visit where it was used:
        est_loop = dist + L * t
    and the rate model gives  pn = qb * [used P* visits before the next] + (1 - qb) * p,
        est_rate = dist + L * (1 - pn) / p
    est = qb * est_loop + (1 - qb) * est_rate (est_rate alone when the loop predicts no use);
    evict the largest.
    """

    def __init__(
        self, L, E, K, C, decay=0.97, lags=31, qdecay=0.8, burst=2.0, floor=1e-6, loops=True,
        loop_next=True,
    ):
        self.L, self.E, self.K = L, E, K
        self.loops, self.loop_next = loops, loop_next  # ablation switches
        self.d, self.H, self.qd, self.burst, self.floor = decay, lags, qdecay, burst, floor
        self.visit = [0] * L
        self.last_step = [None] * L
        self.reset_at = [0] * L
        self.avg = [float(K)] * L
        self.q = [[0.0] * (lags + 1) for _ in range(L)]
        self.sizes = [[0] * (lags + 1) for _ in range(L)]  # ring by visit index
        self.slot = {}  # key -> [p, hist, last]
        self.cur = 0

    def bits(self, key, v):
        s = self.slot.get(key)
        if s is None or v - s[2] >= 32:
            return 0
        return (s[1] << (v - s[2])) & 0xFFFFFFFF

    def p_now(self, key):
        l = key[0]
        v = self.visit[l]
        s = self.slot.get(key)
        if s is None or s[2] <= self.reset_at[l]:
            return 0.0
        p = s[0] * self.d ** (v - s[2])
        n = v - self.reset_at[l]
        return p / (1.0 - self.d**n)

    def on_step(self, step, layer, accesses):
        self.cur = layer
        by_layer = {}
        for key in accesses:
            by_layer.setdefault(key[0], []).append(key)
        for l, keys in by_layer.items():
            step_of = step if l <= layer else step - 1
            if self.last_step[l] != step_of:
                self.last_step[l] = step_of
                self.visit[l] += 1
                self.new_visit(l, keys)
            else:
                for key in keys:
                    self.use(key, self.visit[l])

    def new_visit(self, l, keys):
        v, n = self.visit[l], len(keys)
        is_burst = n > self.burst * self.avg[l] and n > 2 * self.K
        self.avg[l] = 0.9 * self.avg[l] + 0.1 * n
        ring = self.sizes[l]
        if is_burst:
            self.reset_at[l] = v
            ring[v % (self.H + 1)] = 0
            return
        inter = [0] * (self.H + 1)
        for key in keys:
            b = self.bits(key, v)
            for P in range(1, self.H + 1):
                inter[P] += (b >> P) & 1
        q = self.q[l]
        for P in range(1, self.H + 1):
            size = ring[(v - P) % (self.H + 1)] if v - P > 0 else 0
            if size > 0:
                q[P] = self.qd * q[P] + (1 - self.qd) * inter[P] / size
        ring[v % (self.H + 1)] = n
        for key in keys:
            self.use(key, v)

    def use(self, key, v):
        s = self.slot.get(key)
        if s is None:
            s = self.slot[key] = [0.0, 0, 0]
        if s[2] == v:
            return
        valid = s[2] > self.reset_at[key[0]]
        p = s[0] * self.d ** (v - s[2]) if valid else 0.0
        s[0] = p + (1 - self.d)
        s[1] = self.bits(key, v) | 1
        s[2] = v

    def victims(self, cands, count):
        best = []
        for l in range(self.L):
            q = self.q[l]
            P = max(range(1, self.H + 1), key=lambda j: (q[j], -j))
            best.append((P, q[P]))

        def est(key):
            l = key[0]
            dist = (l - self.cur - 1) % self.L + 1
            P, qb = best[l] if self.loops else (1, 0.0)
            b = self.bits(key, self.visit[l])
            p = self.p_now(key)
            pn = qb * ((b >> (P - 1)) & 1) + (1 - qb) * p
            rate = dist + self.L * (1 - pn) / max(p, self.floor)
            for t in range(P if self.loop_next else 0):
                if (b >> (P - 1 - t)) & 1:
                    return qb * (dist + self.L * t) + (1 - qb) * rate
            return rate

        return sorted(cands, key=lambda k: (-est(k), k))[:count]


class Belady(Policy):
    def __init__(self, visits):
        self.occ = {}
        for i, (_, layer, exps) in enumerate(visits):
            for e in exps:
                self.occ.setdefault((layer, e), []).append(i)
        self.i = -1

    def on_step(self, step, layer, accesses):
        self.i += 1

    def next_use(self, key):
        lst = self.occ.get(key, [])
        j = bisect.bisect_right(lst, self.i)
        return lst[j] if j < len(lst) else 1 << 60

    def victims(self, cands, count):
        return sorted(cands, key=lambda k: (-self.next_use(k), k))[:count]


def replay(visits, C, pol):
    pool = set()
    hits = acc = 0
    for step, layer, exps in visits:
        keys = [(layer, e) for e in exps]
        pol.on_step(step, layer, keys)
        misses = [k for k in keys if k not in pool]
        acc += len(keys)
        hits += len(keys) - len(misses)
        need = len(pool) + len(misses) - C
        if need > 0:
            pinned = set(keys)
            cands = sorted(k for k in pool if k not in pinned)
            victims = pol.victims(cands, min(need, len(cands)))
            assert len(set(victims)) == len(victims) and not pinned & set(victims)
            pool.difference_update(victims)
        pol.end_step()
        for k in misses:
            if len(pool) < C:  # else: more misses than unpinned room, served uncached
                pool.add(k)
                pol.on_insert(k)
    return hits / acc


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    path = args[0] if args else DEFAULT
    visits, L, E, K = load_visits(path)
    N = L * E
    caps = [int(N * f) for f in (0.05, 0.10, 0.25, 0.50)]
    if "--lfu" in sys.argv:
        for mult in (1, 2, 4, 8, 16, 64):
            r = [replay(visits, C, LFU(L, E, K, C, period=mult * C)) for C in caps]
            print(f"LFU period {mult}xC: " + " ".join(f"{x:.3f}" for x in r), flush=True)
        return
    if "--wasm" in sys.argv:
        print("| guest (wasm) | " + " | ".join(f"C={C} ({C / N:.0%})" for C in caps) + " |")
        print("| --- " * (len(caps) + 1) + "|")
        for name in ("layer_cycle", "lfu", "lru"):
            r = [replay(visits, C, Wasm(name, L, E, K, C)) for C in caps]
            print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in r) + " |", flush=True)
        return
    if "--tune" in sys.argv:
        # ablation, each row adding one part (the last row is the shipped policy)
        off = dict(burst=1e9, loops=False, loop_next=False)
        grid = [
            dict(off, decay=0.9),
            dict(off),
            dict(off, burst=2.0),
            dict(off, burst=2.0, loops=True, lags=8),
            dict(off, burst=2.0, loops=True),
            dict(),
        ]
        grid += [dict(decay=d) for d in (0.95, 0.98)] + [dict(qdecay=q) for q in (0.7, 0.9)]
        for kw in grid:
            r = [replay(visits, C, LayerCycle(L, E, K, C, **kw)) for C in caps]
            print(f"{kw}: " + " ".join(f"{x:.3f}" for x in r), flush=True)
        return
    rows = {
        "layer-cycle": lambda C: LayerCycle(L, E, K, C),
        "quick (notes)": lambda C: Quick(L, E, K, C),
        "LFU": lambda C: LFU(L, E, K, C),
        "LRU": lambda C: LRU(L, E, K, C),
        "Belady (bound)": lambda C: Belady(visits),
    }
    print(f"{path}: {L} layers x {E} experts, top-{K}, {len(visits)} layer steps")
    print("| policy | " + " | ".join(f"C={C} ({C / N:.0%})" for C in caps) + " |")
    print("| --- " * (len(caps) + 1) + "|")
    for name, mk in rows.items():
        r = [replay(visits, C, mk(C)) for C in caps]
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in r) + " |", flush=True)


if __name__ == "__main__":
    main()
