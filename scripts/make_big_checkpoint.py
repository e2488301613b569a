"""A random-weight bf16 Llama checkpoint larger than this machine's RAM, written one layer per shard so
that no more than one layer is ever in memory. Default: 18 decoder layers with Llama-3-70B's shapes
(hidden 8192, intermediate 28672, 64/8 heads), SmolLM2's tokenizer and vocabulary (49152, tied
embeddings) so that `qconvert gguf` has a tokenizer to convert: 30.8 GB.

    python scripts/make_big_checkpoint.py /tmp/big [--layers 18]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

MODELS_DIR = Path.home() / ".cache" / "qconvert" / "models"
SHAPES = dict(vocab_size=49152, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
              num_key_value_heads=8, head_dim=128)


def layer_tensors(i: int, hidden: int, inter: int, kv: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter)}


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=18)
    args = ap.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    out: Path = args.out
    out.mkdir(parents=True)
    config = AutoConfig.for_model("llama", num_hidden_layers=args.layers, tie_word_embeddings=True, bos_token_id=1,
                                  eos_token_id=2, torch_dtype="bfloat16", **SHAPES)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(MODELS_DIR / "smollm2-135m").save_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    kv = SHAPES["num_key_value_heads"] * SHAPES["head_dim"]
    shards = [{"model.embed_tokens.weight": (SHAPES["vocab_size"], SHAPES["hidden_size"]),
               "model.norm.weight": (SHAPES["hidden_size"],)}]
    shards += [layer_tensors(i, SHAPES["hidden_size"], SHAPES["intermediate_size"], kv) for i in range(args.layers)]
    weight_map, total, start = {}, 0, time.perf_counter()
    for k, shapes in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, gen) for name, shape in shapes.items()}
        save_file(tensors, out / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
        print(f"{file}: {total / 1e9:.1f} GB in {time.perf_counter() - start:.0f} s", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


if __name__ == "__main__":
    main()
