"""A wide random-init DeepSeek-V3-architecture model (bf16, 3.2 GB) whose decode reads its
experts from RAM, made by transformers: `python3 make_model.py OUT_DIR` (see run.sh)."""
import json, shutil, sys, torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
src = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "host/models/tiny-k2")
out = sys.argv[1]
cfg = json.load(open(f"{src}/config.json"))
cfg.update(hidden_size=2048, intermediate_size=4096, moe_intermediate_size=1024, num_hidden_layers=5,
           n_routed_experts=64, num_experts_per_tok=6, num_attention_heads=16, num_key_value_heads=16,
           q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
c = DeepseekV3Config(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
torch.manual_seed(0)
with torch.no_grad():
    m = DeepseekV3ForCausalLM(c).to(torch.bfloat16)
m.save_pretrained(out, max_shard_size="2GB")
for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]:
    shutil.copy(f"{src}/{f}", out)
