#!/usr/bin/env python3
"""A Kimi-K2-Thinking-layout copy of a variant: routed experts stored as compressed-tensors `pack-quantized`
INT4 (group 32, symmetric, bf16 scales), packed by the `compressed-tensors` package itself, everything else as
in the source; and golden outputs from transformers run on the dequantized weights.

    pip install torch transformers safetensors numpy compressed-tensors
    python3 tests/data/variants/make_int4.py            # dsv3-groups -> dsv3-groups-int4

Scales are each group's max |w| / 7, rounded to bf16 (Kimi-K2-Thinking's scales are bf16; it was trained
quantization-aware, this one is quantized after the fact). The reference weights are (q - 8 + 8) * scale ==
q * scale computed in float32, which is exact (a 4-bit integer times a bf16 scale fits float32); the
library's own decompress rounds that product to bf16, which this golden deliberately does not.
"""
import json
import os
import re
import shutil
import sys
import tempfile

import compressed_tensors
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_variants as mv  # noqa: E402

HERE = mv.HERE
EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
GROUP = 32


def main(src_name="dsv3-groups"):
    torch.set_num_threads(1)
    src = os.path.join(HERE, src_name)
    out = os.path.join(HERE, src_name + "-int4")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    qcfg = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="pack-quantized",
        quantization_status="compressed",
        # Kimi-K2-Thinking keeps everything but the routed experts in bf16.
        ignore=["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|down)_proj.*",
                r"re:.*mlp\.gate$"],
    ).to_dict()
    qcfg["quant_method"] = "compressed-tensors"

    stored, dequantized = {}, {}
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            if not EXPERT.match(name):
                stored[name] = w
                dequantized[name] = w
                continue
            rows, cols = w.shape
            assert cols % GROUP == 0
            scale = (w.view(rows, cols // GROUP, GROUP).abs().amax(-1) / 7.0).clamp_min(1e-8).to(torch.bfloat16)
            packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
            base = name[: -len(".weight")]
            for k, v in packed.items():
                stored[f"{base}.{k}"] = v.contiguous()
            assert set(packed) == {"weight_packed", "weight_scale", "weight_shape"}, sorted(packed)
            assert packed["weight_packed"].dtype == torch.int32 and packed["weight_scale"].dtype == torch.bfloat16
            q = unpack_from_int32(packed["weight_packed"], 4, torch.Size(packed["weight_shape"].tolist()))
            assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7
            dequantized[name] = q.to(torch.float32) * scale.to(torch.float32).repeat_interleave(GROUP, dim=1)
            # Packing is eight values per int32, low nibble first, each stored as value + 8.
            p = packed["weight_packed"][0, 0].item() & 0xFFFFFFFF
            assert [(p >> (4 * i)) & 0xF for i in range(8)] == [int(v) + 8 for v in q[0, :8]]

    os.makedirs(out, exist_ok=True)
    out_cfg = dict(cfg)
    out_cfg["quantization_config"] = qcfg
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(out_cfg, f, indent=2)
        f.write("\n")
    save_file({k: stored[k] for k in sorted(stored)}, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(src, "tokenizer.json"), os.path.join(out, "tokenizer.json"))

    # transformers on the dequantized weights (float32, eager), the same prompts as the source.
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file({k: v.contiguous() for k, v in dequantized.items()}, os.path.join(tmp, "model.safetensors"))
    model = mv.load_eager(tmp)
    shutil.rmtree(tmp)
    # Random prompts as the variants have, from the first seed whose routing has no near-tie.
    for seed in range(100):
        prompts = mv.make_prompts(cfg, torch.Generator().manual_seed(5000 + seed))
        gold, stats = mv.goldens(model, cfg, prompts)
        if all(st["min_topk_gap"] >= mv.TIE_EPS and st["min_group_gap"] >= mv.TIE_EPS
               and st["min_logit_top2_gap"] >= mv.TIE_EPS and st["min_greedy_step_gap"] >= 1e-3
               and st["greedy_nocache_same"] for st in stats):
            break
    else:
        raise RuntimeError("no prompt seed without near-ties")
    save_file(gold, os.path.join(out, "golden.safetensors"), metadata={
        "generator": json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                                 "compressed-tensors": compressed_tensors.__version__, "source": src_name,
                                 "prompt_seed": 5000 + seed},
                                sort_keys=True)})
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
