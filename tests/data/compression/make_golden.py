#!/usr/bin/env python3
"""Reference outputs for a converted ("mini") tiny-k2, from Hugging Face transformers.

The test (tests/compression.rs) converts the bundled tiny-k2 with

    moehost convert --model host/models/tiny-k2 --out MINI --layers 4 --experts 16 \
        --profile tests/data/compression/profile.json

and checks moehost's logits and greedy tokens on MINI against this file. Regenerate with
(from the repo root; needs torch, transformers>=5, safetensors):

    cargo run --release -- convert --model host/models/tiny-k2 --out /tmp/mini4 --layers 4 \
        --experts 16 --profile tests/data/compression/profile.json
    python3 tests/data/compression/make_golden.py /tmp/mini4

transformers loading the folder at all is part of the check: the converted folder must be a
valid DeepSeek-V3 checkpoint.
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, DeepseekV3ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = [
    "<|bos|>The software is distributed in the hope that it will be useful",
    "<|bos|>def main():\n    import sys\n",
]
NEW_TOKENS = 16

mini = sys.argv[1]
tok = AutoTokenizer.from_pretrained(mini)
model = DeepseekV3ForCausalLM.from_pretrained(mini, torch_dtype=torch.float32, attn_implementation="eager")
model.eval()
out = {}
with torch.no_grad():
    for i, p in enumerate(PROMPTS):
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        logits = model(ids).logits[0]
        gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, ids.shape[1]:]
        out[f"prompt{i}.input_ids"] = ids[0].to(torch.int32)
        out[f"prompt{i}.logits"] = logits.contiguous()
        out[f"prompt{i}.greedy_ids"] = gen.to(torch.int32)
save_file(out, os.path.join(HERE, "golden-mini4.safetensors"),
          metadata={"model": "tiny-k2 -> 4 layers x 16 experts (profile)", "transformers": __import__("transformers").__version__})
print("wrote", {k: tuple(v.shape) for k, v in out.items()})
