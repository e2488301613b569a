"""Load any checkpoint qconvert reads, quantized or not, as a dense transformers model.

Quantized outputs are read back through the format's own reader and dequantized, so evaluation
scores exactly what was written to disk.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qconvert.errors import QConvertError
from qconvert.eval.activations import add_activation_hooks, fake_quantizer
from qconvert.formats import awq, compressed_tensors, fp8, gptq, marlin
from qconvert.kv_cache import ATTENTION, SCALES, add_kv_rounding
from qconvert.model.checkpoint import Checkpoint, resolve_model
from qconvert.quantized import FP8Tensor, QuantizedTensor

READERS = {
    compressed_tensors.QUANT_METHOD: compressed_tensors.read,
    awq.QUANT_METHOD: awq.read,
    gptq.QUANT_METHOD: gptq.read,
    fp8.QUANT_METHOD: fp8.read,
}


def dequantized_state(ckpt: Checkpoint, quantizers: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor, quantized linears dequantized; `quantizers` (when given) receives, per W8A8
    linear, the function that rounds its input activations as the engine's kernel does."""
    return dict(dequantized_tensors(ckpt, quantizers))


def dequantized_tensors(ckpt: Checkpoint, quantizers: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """dequantized_state one tensor at a time (an output larger than memory can be checked)."""
    qc = ckpt.config_dict["quantization_config"]
    method = qc.get("quant_method")
    reader = marlin.read if marlin.is_marlin(qc) else READERS.get(method)  # marlin: gptq's quant_method
    if reader is None:
        raise QConvertError(f"{ckpt.path}: cannot read quantization method '{method}'")
    for name, t in reader(ckpt):
        if isinstance(t, (QuantizedTensor, FP8Tensor)):
            module = name.removesuffix(".weight")
            args = _input_activations(qc, module)
            if args is not None and quantizers is not None:
                quantizers[module] = fake_quantizer(args, getattr(t, "input_scale", None))
            t = t.dequantize()
        yield name, t


_KV_SCALE = re.compile(rf"(.+)\.(\d+)\.{ATTENTION}\.({'|'.join(SCALES)})$")


def pop_kv_scales(state: dict[str, torch.Tensor]) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """Take the FP8 KV-cache scales out of `state`: {layer list path: {layer index: {k_scale, v_scale}}}."""
    found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name in [n for n in state if _KV_SCALE.match(n)]:
        layers, index, scale = _KV_SCALE.match(name).groups()
        found.setdefault(layers, {}).setdefault(int(index), {})[scale] = state.pop(name)
    return found


def _input_activations(qc: dict, module: str) -> dict | None:
    if qc.get("quant_method") == fp8.QUANT_METHOD:
        return {"num_bits": 8, "type": "float", "strategy": "group", "group_size": fp8.BLOCK[1]}
    if qc.get("quant_method") == compressed_tensors.QUANT_METHOD:
        return compressed_tensors.scheme_for(module, qc).get("input_activations")
    return None


def _load_gguf(file: Path, dtype: torch.dtype):
    """A GGUF file, dequantized by transformers' GGUF reader (gguf-py's block dequantizers)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except Exception as exc:
        raise QConvertError(f"{file}: transformers cannot load this GGUF file ({exc})") from None
    return model, tokenizer


def is_gguf(file: Path) -> bool:
    """By the file's magic, not its name: `-o` may name a GGUF output anything."""
    with open(file, "rb") as f:
        return f.read(4) == b"GGUF"


def load_model(spec: str, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) for a checkpoint directory, hub id or GGUF file."""
    if Path(spec).is_file() and is_gguf(Path(spec)):
        model, tokenizer = _load_gguf(Path(spec), dtype)
        return model.to(device).eval(), tokenizer
    path = resolve_model(spec)
    ckpt = Checkpoint(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise QConvertError(f"{path}: cannot load its tokenizer ({exc})") from None
    if "quantization_config" not in ckpt.config_dict:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        with tempfile.TemporaryDirectory(prefix="qconvert-eval-") as tmp:
            quantizers = {}
            state = dequantized_state(ckpt, quantizers)
            kv_scales = pop_kv_scales(state)
            save_file({k: v.contiguous() for k, v in state.items()}, Path(tmp) / "model.safetensors")
            del state
            config = {k: v for k, v in ckpt.config_dict.items() if k != "quantization_config"}
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
        add_activation_hooks(model, quantizers)
        for layers, scales in kv_scales.items():
            add_kv_rounding(model.get_submodule(layers), scales)
    return model.to(device).eval(), tokenizer
