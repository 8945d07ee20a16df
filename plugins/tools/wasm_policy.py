#!/usr/bin/env python3
"""Load a moehost policy component in wasmtime (pip install wasmtime) with an EMPTY linker,
as the host does, and call its exports. Used by smoke.py and evict_sim.py --wasm.

Records are passed as objects with the WIT field names (kebab-case) as attributes; enums as
their case names ("device", "host", "disk"). The contract is moehost:policy@0.2.0 (flat lists:
tier codes, expert-ids, packed events); `version="0.1.0"` loads a guest of the frozen 0.1.0.
"""
import os
import wasmtime
import wasmtime.component as wc

HERE = os.path.dirname(os.path.abspath(__file__))
RELEASE = os.path.join(HERE, "..", "target", "wasm32-wasip2", "release")
VERSION = "0.2.0"
KINDS = ("selection", "eviction", "prefetch")
# Tier codes of the flat lists, and event kinds.
TIER = {"device": 0, "host": 1, "disk": 2}
ACCESS, INSERT, REMOVE = 0, 1, 2


def rec(**fields):
    """A WIT record value: rec(moe_layers=7) -> object with attribute 'moe-layers'."""
    o = wc.Record()
    for k, v in fields.items():
        setattr(o, k.replace("_", "-"), v)
    return o


def get(r, name):
    return getattr(r, name.replace("_", "-"))


def shape(layers, experts, k, expert_bytes=98304):
    return rec(moe_layers=layers, experts_per_layer=experts, top_k=k, expert_bytes=expert_bytes)


def cap(tier, slots, expert_bytes=98304):
    return rec(tier=tier, slots=slots, bytes=slots * expert_bytes)


def eref(layer, expert):
    """A 0.1.0 expert-ref record (legacy guests)."""
    return rec(layer=layer, expert=expert)


def eid(layer, expert, experts_per_layer):
    """A 0.2.0 expert-id."""
    return layer * experts_per_layer + expert


def event(kind, tier, expert_id):
    """A 0.2.0 packed eviction event: kind << 30 | tier-code << 28 | expert-id."""
    return kind << 30 | TIER.get(tier, tier) << 28 | expert_id


def codes(names):
    """A 0.2.0 flat residency list (`list<u8>`: wasmtime-py takes `bytes`) from tier names."""
    return bytes(TIER[n] for n in names)


def resident_set(pairs=()):
    """A 0.2.0 resident-set from (expert-id, tier name or code) pairs."""
    pairs = list(pairs)
    return rec(experts=[e for e, _ in pairs], tiers=bytes(TIER.get(t, t) for _, t in pairs))


class Plugin:
    """One instance of a policy component. `fuel` bounds every call (None: unbounded);
    `memory` bounds linear memory in bytes."""

    def __init__(self, name, kind, fuel=None, memory=None, version=VERSION):
        cfg = wasmtime.Config()
        if fuel is not None:
            cfg.consume_fuel = True
        self.engine = wasmtime.Engine(cfg)
        path = name if name.endswith(".wasm") else os.path.join(RELEASE, name + ".wasm")
        self.component = wc.Component.from_file(self.engine, path)
        self.store = wasmtime.Store(self.engine)
        if memory is not None:
            self.store.set_limits(memory_size=memory)
        self.fuel = fuel
        self.instance = wc.Linker(self.engine).instantiate(self.store, self.component)
        iface = f"moehost:policy/{kind}@{version}"
        idx = self.instance.get_export_index(self.store, iface)
        if idx is None:
            raise ValueError(f"{path} does not export {iface}")
        self.iface = idx

    def call(self, func, *args):
        if self.fuel is not None:
            self.store.set_fuel(self.fuel)
        i = self.instance.get_export_index(self.store, func, self.iface)
        return self.instance.get_func(self.store, i)(self.store, *args)
