#!/usr/bin/env python3
"""Markdown tables for docs/replay-report.md from `moehost replay --json` rows.

    python3 plugins/tools/replay_tables.py rows.json [summary.json]

Prints, per trace: eviction policies alone (hit rate and ratio to Belady) and the
eviction+prefetch pairs (hit rate, tokens/s ceiling, share of prefetches used); then the
across-trace summary when given (`moehost replay --summary`).
"""
import json
import sys
from collections import OrderedDict


def pct(r):
    return round(r["resident_fraction"] * 100, 1)


def main():
    rows = json.load(open(sys.argv[1]))
    traces = OrderedDict()
    for r in rows:
        traces.setdefault(r["trace"], []).append(r)
    for trace, rs in traces.items():
        caps = sorted({pct(r) for r in rs})
        held = " (held out)" if rs[0].get("held_out") else ""
        print(f"#### {trace}{held}\n")
        print("| policy | " + " | ".join(f"{c:g}%" for c in caps) + " |")
        print("| --- " * (len(caps) + 1) + "|")
        policies = list(OrderedDict.fromkeys(r["policy"] for r in rs))
        for p in policies:
            cells = []
            for c in caps:
                r = next((x for x in rs if x["policy"] == p and pct(x) == c), None)
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{r['hit_rate']:.3f}"
                if p not in ("belady", "oracle-prefetch") and r["belady_hit_rate"] > 0:
                    cell += f" ({r['vs_belady']:.2f}x)"
                if r["prefetch"] not in ("none",):
                    cell += f" · {r['tokens_per_s_ceiling']:.1f}"
                    if r["prefetch_issued"]:
                        cell += f" · {100 * r['prefetch_used'] / r['prefetch_issued']:.0f}%"
                elif p != "oracle-prefetch":
                    cell += f" · {r['tokens_per_s_ceiling']:.1f}"
                cells.append(cell)
            print(f"| {p} | " + " | ".join(cells) + " |")
        print()
    if len(sys.argv) > 2:
        summary = json.load(open(sys.argv[2]))
        shares = list(OrderedDict.fromkeys(s["capacity"] for s in summary if s["capacity"]))
        print("| policy | traces | " + " | ".join(shares) + " | all |")
        print("| --- " * (len(shares) + 3) + "|")
        lines = list(OrderedDict.fromkeys((s["policy"], s["set"]) for s in summary))
        for p, st in lines:
            cells = []
            for share in shares + [None]:
                s = next(
                    (x for x in summary
                     if x["policy"] == p and x["set"] == st and x["capacity"] == share),
                    None,
                )
                g = s and s["geomean_vs_belady"]
                cells.append(f"{g:.3f} ({s['rows']})" if g is not None else "-")
            print(f"| {p} | {st} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
