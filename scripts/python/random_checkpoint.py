"""Write an HF directory whose weights are random but whose shapes are a real model's, for
timing a runtime where the real weights cannot be copied (a GPU machine with no network).
Speed depends on shapes, not values.

    python3 random_checkpoint.py SHAPE TOKENIZER_DIR OUT_DIR

SHAPE is `qwen2.5-1.5b` (28 blocks, d_model 1536, tied embeddings) or `tiny` (2 blocks of
the same family, for a smoke test). TOKENIZER_DIR holds tokenizer.json and
tokenizer_config.json from a Qwen2.5 checkpoint (`mechwatch model convert` writes them).
Weights are bf16, N(0, 0.02) from a fixed seed; norms are ones.
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def main():
    shape, tok_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    s = SHAPES[shape]
    d, m, heads, kv = (s["hidden_size"], s["intermediate_size"], s["num_attention_heads"],
                       s["num_key_value_heads"])
    hd = d // heads
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **s, "head_dim": hd,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": True, "vocab_size": 151936, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "torch_dtype": "bfloat16",
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, name), out)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=dev) * 0.02).to(torch.bfloat16).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    t = {"model.embed_tokens.weight": rnd(config["vocab_size"], d), "model.norm.weight": ones(d)}
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({
            p + "input_layernorm.weight": ones(d),
            p + "post_attention_layernorm.weight": ones(d),
            p + "self_attn.q_proj.weight": rnd(heads * hd, d),
            p + "self_attn.q_proj.bias": rnd(heads * hd),
            p + "self_attn.k_proj.weight": rnd(kv * hd, d),
            p + "self_attn.k_proj.bias": rnd(kv * hd),
            p + "self_attn.v_proj.weight": rnd(kv * hd, d),
            p + "self_attn.v_proj.bias": rnd(kv * hd),
            p + "self_attn.o_proj.weight": rnd(d, heads * hd),
            p + "mlp.gate_proj.weight": rnd(m, d),
            p + "mlp.up_proj.weight": rnd(m, d),
            p + "mlp.down_proj.weight": rnd(d, m),
        })
    save_file(t, os.path.join(out, "model.safetensors"))
    print(f"{shape}: {sum(v.numel() for v in t.values()) / 1e9:.2f}B parameters in {out}")


if __name__ == "__main__":
    main()
