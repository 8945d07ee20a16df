"""Subset ../shared/golden/<model>/golden.safetensors into tests/data/golden/<model>.safetensors.

Keeps every routing tensor and greedy id, and the logits of a sample of positions
(first, last and every 16th; greedy-step rows 0, 15, 31) so the copy stays small.
Run from the repository root: python3 tests/data/golden/subset.py
"""
from safetensors.numpy import load_file, save_file
import numpy as np

for model in ["tiny-k2", "tiny-k2-fp8"]:
    g = load_file(f"../shared/golden/{model}/golden.safetensors")
    out = {}
    for p in range(6):
        k = f"prompt{p}"
        t = g[f"{k}.input_ids"].shape[0]
        rows = sorted(set([0, t - 1] + list(range(0, t, 16))))
        step_rows = [0, 15, 31]
        for name in ["input_ids", "greedy_ids", "routed_experts", "routed_weights", "router_logits"]:
            out[f"{k}.{name}"] = np.ascontiguousarray(g[f"{k}.{name}"])
        out[f"{k}.logit_rows"] = np.array(rows, dtype=np.int32)
        out[f"{k}.logits"] = np.ascontiguousarray(g[f"{k}.logits"][rows])
        out[f"{k}.greedy_step_rows"] = np.array(step_rows, dtype=np.int32)
        out[f"{k}.greedy_step_logits"] = np.ascontiguousarray(g[f"{k}.greedy_step_logits"][step_rows])
    save_file(out, f"tests/data/golden/{model}.safetensors", metadata={"source": f"shared/golden/{model}"})
