"""What a checkpoint is, read from config.json and the safetensors headers alone (no tensor data)."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from pathlib import Path

from qconvert.formats import awq, compressed_tensors, gptq, marlin
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


def _ct_modules(ckpt: Checkpoint, qc: dict) -> dict[str, tuple[str, int]]:
    shapes = ckpt.load([n for n in ckpt.names() if n.endswith(".weight_shape")])
    modules = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight_shape")
        args = compressed_tensors.scheme_for(module, qc)["weights"]
        group = "channel" if args["strategy"] == "channel" else f"g{args['group_size']}"
        sym = "sym" if args["symmetric"] else "asym"
        act = " act-order" if args.get("actorder") in compressed_tensors.GROUP_ACTORDER else ""
        modules[module] = (f"int{args['num_bits']} {group} {sym}{act}", math.prod(int(x) for x in shape))
    return modules


def _awq_modules(ckpt: Checkpoint, qc: dict) -> dict[str, tuple[str, int]]:
    scheme = f"int{awq.BITS} g{qc['group_size']} {'asym' if qc.get('zero_point', True) else 'sym'}"
    return {  # qweight is [in, out / 8]
        m: (scheme, ckpt.shape(f"{m}.qweight")[0] * ckpt.shape(f"{m}.qweight")[1] * awq.PACK)
        for m in (n.removesuffix(".qweight") for n in ckpt.names() if n.endswith(".qweight"))
    }


def _gptq_modules(ckpt: Checkpoint, qc: dict) -> dict[str, tuple[str, int]]:
    bits, group = qc["bits"], qc["group_size"]
    scheme = (f"int{bits} {'channel' if group == -1 else f'g{group}'} {'sym' if qc.get('sym', True) else 'asym'}"
              f"{' act-order' if qc.get('desc_act') else ''}")
    return {  # qweight is [in * bits / 32, out]
        m: (scheme, ckpt.shape(f"{m}.qweight")[0] * 32 // bits * ckpt.shape(f"{m}.qweight")[1])
        for m in (n.removesuffix(".qweight") for n in ckpt.names() if n.endswith(".qweight"))
    }


def _marlin_modules(ckpt: Checkpoint, qc: dict) -> dict[str, tuple[str, int]]:
    group = qc.get("group_size", 128)
    scheme = f"int{marlin.BITS} {'channel' if group == -1 else f'g{group}'} sym marlin"
    return {  # B is [in / 16, out * 16 / 8]
        m: (scheme, ckpt.shape(f"{m}.B")[0] * ckpt.shape(f"{m}.B")[1] * 16 // 2)
        for m in (n.removesuffix(".B") for n in ckpt.names() if n.endswith(".B"))
    }


# quant_method -> (module -> (scheme, logical weights), the tensor suffixes a quantized module stores)
_LAYOUTS = {
    compressed_tensors.QUANT_METHOD: (_ct_modules, compressed_tensors.SUFFIXES),
    awq.QUANT_METHOD: (_awq_modules, awq.SUFFIXES),
    gptq.QUANT_METHOD: (_gptq_modules, gptq.SUFFIXES),
}


def _settings(qc: dict) -> dict:
    """The checkpoint-wide settings of the layouts that have them (AWQ, GPTQ)."""
    keys = ("bits", "group_size", "zero_point", "sym", "desc_act")
    return {k: qc[k] for k in keys if k in qc}


def _ignored(qc: dict) -> list[str] | None:
    return qc.get("ignore", qc.get("modules_to_not_convert"))


def _format(qc: dict) -> str | None:
    return qc.get("format") or qc.get("version") or qc.get("checkpoint_format")


def quantized_modules(ckpt: Checkpoint) -> tuple[dict[str, tuple[str, int]], tuple[str, ...]]:
    """module -> (scheme, logical weights) for every quantized module, and the tensor suffixes each stores."""
    qc = ckpt.config_dict.get("quantization_config")
    layout = (_marlin_modules, marlin.SUFFIXES) if marlin.is_marlin(qc) else _LAYOUTS.get((qc or {}).get("quant_method"))
    return (layout[0](ckpt, qc), layout[1]) if layout else ({}, ())


def describe(path: Path) -> dict:
    ckpt = Checkpoint(path)
    cfg = ckpt.config_dict
    qc = cfg.get("quantization_config")
    dtypes: Counter = Counter(ckpt.dtype(name) for name in ckpt.names())
    quantized, suffixes = quantized_modules(ckpt)
    stored = {f"{m}.{s}" for m in quantized for s in suffixes}
    # count logical weights, not packed words, scales or zero points
    params = sum(math.prod(ckpt.shape(n)) for n in ckpt.names() if n not in stored)
    params += sum(n for _, n in quantized.values())
    schemes = {m: scheme for m, (scheme, _) in quantized.items()}
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
            "format": _format(qc),
            **_settings(qc),
            "ignore": _ignored(qc),
            "modules": schemes,
            "by_type": [{"modules": p, "scheme": s, "count": n} for (p, s), n in sorted(by_type.items())],
        },
    }

