"""Load any checkpoint qconvert reads, quantized or not, as a dense transformers model.

Quantized outputs are read back through the format's own reader and dequantized, so evaluation
scores exactly what was written to disk.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qconvert.errors import QConvertError
from qconvert.formats import awq, compressed_tensors, gptq
from qconvert.model.checkpoint import Checkpoint, resolve_model
from qconvert.quantized import QuantizedTensor

READERS = {
    compressed_tensors.QUANT_METHOD: compressed_tensors.read,
    awq.QUANT_METHOD: awq.read,
    gptq.QUANT_METHOD: gptq.read,
}


def dequantized_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    method = ckpt.config_dict["quantization_config"].get("quant_method")
    if method not in READERS:
        raise QConvertError(f"{ckpt.path}: cannot read quantization method '{method}'")
    return {
        name: t.dequantize() if isinstance(t, QuantizedTensor) else t
        for name, t in READERS[method](ckpt)
    }


def load_model(spec: str, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) for a checkpoint directory or hub id."""
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
            state = dequantized_state(ckpt)
            save_file({k: v.contiguous() for k, v in state.items()}, Path(tmp) / "model.safetensors")
            del state
            config = {k: v for k, v in ckpt.config_dict.items() if k != "quantization_config"}
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
    return model.to(device).eval(), tokenizer
