"""vLLM's own FP8 layout (`quant_method: fp8`) with 128 x 128 weight blocks, as DeepSeek-V3 and Qwen3-FP8
ship it; vLLM, SGLang and transformers (FineGrainedFP8) read it.

Per quantized linear `X`:
  X.weight            float8_e4m3fn [out, in]
  X.weight_scale_inv  float32 [ceil(out / 128), ceil(in / 128)]: despite its name the multiplier,
                      weight = fp8 · weight_scale_inv per block
config.json: {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]}; activations are quantized per token and group of 128 at run time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from qconvert.formats.shards import DEFAULT_SHARD_BYTES, PlainTensors, ShardWriter, split_modules
from qconvert.model.checkpoint import Checkpoint
from qconvert.quantized import FP8Tensor

QUANT_METHOD = "fp8"
BLOCK = (128, 128)
SUFFIXES = ("weight", "weight_scale_inv")


def quantization_config(not_converted: list[str]) -> dict:
    # vLLM reads ignored_layers, transformers modules_to_not_convert
    return {"quant_method": QUANT_METHOD, "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(BLOCK), "ignored_layers": not_converted, "modules_to_not_convert": not_converted}


class Writer(PlainTensors):
    scale_dtype = torch.float32

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.shards = ShardWriter(out_dir, max_shard_bytes)


    def add_quantized(self, name: str, qt: FP8Tensor) -> None:
        module = name.removesuffix(".weight")
        if not isinstance(qt, FP8Tensor) or qt.block != BLOCK or qt.input_scale is not None:
            raise ValueError(f"{module}: the fp8 layout holds {BLOCK[0]}x{BLOCK[1]}-block FP8 weights only")
        self.shards.add(name, qt.weight)
        self.shards.add(f"{module}.weight_scale_inv", qt.scale.to(torch.float32))

    def finish(self, not_converted: list[str]) -> dict:
        self.shards.finish()
        return quantization_config(not_converted)


def read(ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor | FP8Tensor]]:
    config = ckpt.config_dict["quantization_config"]
    if list(config.get("weight_block_size") or []) != list(BLOCK):
        raise ValueError(f"fp8 checkpoints with weight_block_size {config.get('weight_block_size')} are not read "
                         f"(only {list(BLOCK)})")

    def module(name: str) -> FP8Tensor:
        t = ckpt.load([f"{name}.weight", f"{name}.weight_scale_inv"])
        return FP8Tensor(t[f"{name}.weight"], t[f"{name}.weight_scale_inv"], BLOCK)

    yield from split_modules(ckpt, "weight_scale_inv", SUFFIXES, module)
