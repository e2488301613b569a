"""What a checkpoint is, read from config.json and the safetensors headers alone (no tensor data)."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from pathlib import Path

from qconvert.formats import compressed_tensors
from qconvert.model.checkpoint import Checkpoint

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_CONFIG_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "tie_word_embeddings",
)


def _pattern(module: str) -> str:
    """model.layers.3.mlp.experts.7.w1 -> model.layers.*.mlp.experts.*.w1"""
    return _LAYER_INDEX.sub(".*.", _LAYER_INDEX.sub(".*.", module))


def _ct_schemes(ckpt: Checkpoint) -> dict[str, str]:
    config = ckpt.config_dict["quantization_config"]
    schemes = {}
    for name in ckpt.names():
        if name.endswith(".weight_packed"):
            module = name.removesuffix(".weight_packed")
            args = compressed_tensors._scheme_for(module, config)
            group = "channel" if args["strategy"] == "channel" else f"g{args['group_size']}"
            sym = "sym" if args["symmetric"] else "asym"
            schemes[module] = f"int{args['num_bits']} {group} {sym}"
    return schemes


def describe(path: Path) -> dict:
    ckpt = Checkpoint(path)
    cfg = ckpt.config_dict
    qc = cfg.get("quantization_config")
    params = 0
    dtypes: Counter = Counter()
    for name in ckpt.names():
        shape = ckpt.shape(name)
        dtypes[ckpt.dtype(name)] += 1
        if name.endswith(".weight_shape"):
            continue
        params += math.prod(shape)
    schemes = _ct_schemes(ckpt) if qc and qc.get("quant_method") == compressed_tensors.QUANT_METHOD else {}
    shapes = ckpt.load([f"{m}.weight_shape" for m in schemes]) if schemes else {}
    for module in schemes:  # count logical weights, not packed words, scales or zero points
        params -= sum(math.prod(ckpt.shape(f"{module}.{s}")) for s in compressed_tensors.SUFFIXES
                      if f"{module}.{s}" in ckpt and s != "weight_shape")
        params += math.prod(int(x) for x in shapes[f"{module}.weight_shape"])
    by_type: dict[tuple[str, str], int] = defaultdict(int)
    for module, scheme in schemes.items():
        by_type[(_pattern(module), scheme)] += 1
    return {
        "path": str(path),
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        "config": {k: cfg[k] for k in _CONFIG_KEYS if k in cfg},
        "dtype": cfg.get("torch_dtype") or cfg.get("dtype"),
        "tensor_dtypes": dict(dtypes),
        "parameters": params,
        "size_bytes": ckpt.nbytes(),
        "quantization": None if qc is None else {
            "quant_method": qc.get("quant_method"),
            "format": qc.get("format"),
            "ignore": qc.get("ignore"),
            "modules": schemes,
            "by_type": [{"modules": p, "scheme": s, "count": n} for (p, s), n in sorted(by_type.items())],
        },
    }

