"""compressed-tensors `pack-quantized` (weight-only int, W4A16 / W8A16), as vLLM and transformers read it.

Layout (compressed-tensors 0.20, PackedQuantizationCompressor), per quantized linear `X`:
  X.weight_packed      int32 [out, ceil(in * bits / 32)]  codes offset to unsigned (q + 2**(bits-1)),
                       packed densely along the input dim: element i at bits [i*bits, (i+1)*bits)
  X.weight_scale       [out, groups] in the model's dtype
  X.weight_shape       int64 [2] = (out, in)
  X.weight_zero_point  int32 [ceil(out * bits / 32), groups], asymmetric only: zero points offset to
                       unsigned, packed the same way along the output dim
  X.weight_g_idx       int32 [in], act-order only (weights args `actorder: "group"`): the group of each
                       input column; every group holds exactly group_size columns, because the
                       dequantizer sorts the columns by g_idx and cuts them into runs of group_size
Dequantization: (q - z) * scale, computed in the scale's dtype.

Act-order ("group", alias "dynamic") is read by compressed-tensors up to 0.18 and by vLLM through it
(vLLM 0.28-0.30 pin 0.17). compressed-tensors 0.19 removed it: 0.19 and 0.20 refuse such a config when
they parse it ("actorder='group' has been removed"), so transformers with those versions cannot load
it. "weight" (alias "static") only changes calibration and stores no g_idx, like no act-order at all.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from qconvert.formats.bitpack import pack_bits, unpack_bits
from qconvert.formats.shards import DEFAULT_SHARD_BYTES, PlainTensors, ShardWriter, split_modules
from qconvert.model.checkpoint import Checkpoint
from qconvert.quantized import FP8Tensor, QuantizedTensor

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
SPEC_VERSION = "0.20.0"
log = logging.getLogger(__name__)
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
GROUP_ACTORDER = ("group", "dynamic")  # actorder values that mean "weight_g_idx is stored"


def weights_args(qt: QuantizedTensor) -> dict:
    return {
        "actorder": None if qt.g_idx is None else "group",
        "block_structure": None,
        "dynamic": False,
        "group_size": None if qt.group_size == -1 else qt.group_size,
        "num_bits": qt.bits,
        "observer": "minmax",
        "observer_kwargs": {},
        "strategy": "channel" if qt.group_size == -1 else "group",
        "symmetric": qt.symmetric,
        "type": "int",
    }


def quantization_config(schemes: dict[str, dict], ignore: list[str], fmt: str = FORMAT) -> dict:
    """config.json `quantization_config`; schemes maps module name -> {"weights": args,
    "input_activations": args or None}."""
    key = lambda scheme: json.dumps(scheme, sort_keys=True)  # noqa: E731
    distinct = {key(s): s for s in schemes.values()}
    groups = {}
    for i, (k, scheme) in enumerate(distinct.items()):
        if len(distinct) == 1:
            targets = ["Linear"]
        else:
            targets = sorted(m for m, s in schemes.items() if key(s) == k)
        groups[f"group_{i}"] = {"input_activations": None, "output_activations": None, **scheme, "targets": targets}
    return {
        "config_groups": groups,
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": SPEC_VERSION,
    }


class Writer(PlainTensors):
    """Streams a model's tensors into compressed-tensors pack-quantized safetensors shards."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.shards = ShardWriter(out_dir, max_shard_bytes)
        self.schemes: dict[str, dict] = {}


    def add_quantized(self, name: str, qt: QuantizedTensor) -> None:
        module = name.removesuffix(".weight")
        if qt.g_idx is not None:
            _check_g_idx(module, qt)
            self.shards.add(f"{module}.weight_g_idx", qt.g_idx.to(torch.int32))
        self.shards.add(f"{module}.weight_packed", pack_bits(qt.codes, qt.bits))
        self.shards.add(f"{module}.weight_scale", qt.scale)
        self.shards.add(f"{module}.weight_shape", torch.tensor(qt.shape, dtype=torch.int64))
        if not qt.symmetric:
            self.shards.add(f"{module}.weight_zero_point", pack_bits(qt.zero.T.contiguous(), qt.bits).T.contiguous())
        self.schemes[module] = {"weights": weights_args(qt)}

    def finish(self, ignore: list[str]) -> dict:
        """Close the shards; returns the quantization_config for config.json."""
        self.shards.finish()
        act_order = sum(s["weights"]["actorder"] is not None for s in self.schemes.values())
        if act_order:
            log.warning("%d module(s) written with act-order (actorder 'group'): compressed-tensors 0.19+ and "
                        "transformers with it refuse them; vLLM with compressed-tensors <= 0.18 reads them", act_order)
        return quantization_config(self.schemes, ignore)


def _check_g_idx(module: str, qt: QuantizedTensor) -> None:
    sizes = torch.bincount(qt.g_idx.long(), minlength=qt.num_groups)
    if qt.group_size == -1 or len(sizes) != qt.num_groups or (sizes != qt.group_size).any():
        raise ValueError(f"{module}: act-order g_idx must put exactly group_size columns in each group "
                         f"(group size {qt.group_size})")


def scheme_for(module: str, config: dict) -> dict:
    groups = list(config["config_groups"].values())
    for group in groups:
        for target in group["targets"]:
            if target == "Linear" or target == module or (
                target.startswith("re:") and re.fullmatch(target[3:], module)
            ):
                return group
    raise ValueError(f"{module}: no config group targets it")


def read(ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor | FP8Tensor]]:
    """Every tensor of a pack-, int- or float-quantized checkpoint; quantized linears come back as
    QuantizedTensor or FP8Tensor."""
    config = ckpt.config_dict["quantization_config"]
    fmt = config.get("format")
    if fmt == FORMAT:
        yield from split_modules(ckpt, "weight_packed", SUFFIXES, lambda module: _read_module(ckpt, module, config))
    elif fmt in DENSE_FORMATS:
        yield from split_modules(ckpt, "weight_scale", DENSE_SUFFIXES, lambda module: _read_dense(ckpt, module, config))
    else:
        raise ValueError(f"compressed-tensors format {fmt!r} is not one of {FORMAT}, {', '.join(DENSE_FORMATS)}")


def _read_module(ckpt: Checkpoint, module: str, config: dict) -> QuantizedTensor:
    args = scheme_for(module, config)["weights"]
    bits = args["num_bits"]
    t = ckpt.load([f"{module}.{s}" for s in SUFFIXES if f"{module}.{s}" in ckpt])
    out, cols = (int(x) for x in t[f"{module}.weight_shape"])
    codes = unpack_bits(t[f"{module}.weight_packed"], bits, cols)
    scale = t[f"{module}.weight_scale"]
    zero = None
    if not args["symmetric"]:
        zero = unpack_bits(t[f"{module}.weight_zero_point"].T.contiguous(), bits, out).T.contiguous()
    group_size = -1 if args["strategy"] == "channel" else args["group_size"]
    g_idx = None
    if args.get("actorder") in GROUP_ACTORDER or args.get("actorder") is True:
        g_idx = t[f"{module}.weight_g_idx"].to(torch.int32)
        # -1 entries mean "never set" to compressed-tensors, and column order is no act-order at all
        if (g_idx == -1).any() or torch.equal(g_idx.long(), torch.arange(cols) // group_size):
            g_idx = None
    return QuantizedTensor(codes, scale, zero, bits, group_size, g_idx)


# -- int-quantized (W8A8) and float-quantized (FP8) --------------------------------------------------
# Layout (compressed-tensors 0.20, NaiveQuantizationCompressor), per quantized linear `X`:
#   X.weight        int8 or float8_e4m3fn [out, in], the codes themselves
#   X.weight_scale  [out, 1] per channel, [1] per tensor, [ceil(out/128), ceil(in/128)] per block; model dtype
#   X.input_scale   [1], static activation scale (FP8 static only)
# Dequantization: weight · scale in the scale's dtype. The activation scheme lives in the config only.
DENSE_FORMATS = ("int-quantized", "float-quantized")
DENSE_SUFFIXES = ("weight", "weight_scale", "input_scale")


def _args(type_: str, strategy: str, dynamic: bool, group_size=None, block=None, observer="minmax") -> dict:
    return {"actorder": None, "block_structure": block, "dynamic": dynamic, "group_size": group_size, "num_bits": 8,
            "observer": observer, "observer_kwargs": {}, "strategy": strategy, "symmetric": True, "type": type_}


def dense_scheme(qt: QuantizedTensor | FP8Tensor) -> dict:
    """The config group of one W8A8 linear: int8 per channel with int8 activations per token, or FP8
    weights with the activation scheme that goes with their layout (vLLM's three FP8 schemes)."""
    if isinstance(qt, QuantizedTensor):
        return {"weights": _args("int", "channel", False),
                "input_activations": _args("int", "token", True, observer=None)}
    if qt.block is not None:
        return {"weights": _args("float", "block", False, block=list(qt.block)),
                "input_activations": _args("float", "group", True, group_size=qt.block[1], observer=None)}
    if qt.input_scale is not None:
        return {"weights": _args("float", "tensor", False), "input_activations": _args("float", "tensor", False)}
    return {"weights": _args("float", "channel", False), "input_activations": _args("float", "token", True, observer=None)}


class DenseWriter(PlainTensors):
    """Streams a model into compressed-tensors int-quantized (int8 codes) or float-quantized (FP8)."""

    scale_dtype = None  # the model's own dtype

    def __init__(self, out_dir: Path, fmt: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.shards = ShardWriter(out_dir, max_shard_bytes)
        self.fmt = fmt
        self.schemes: dict[str, dict] = {}


    def add_quantized(self, name: str, qt: QuantizedTensor | FP8Tensor) -> None:
        module = name.removesuffix(".weight")
        if isinstance(qt, QuantizedTensor):
            if qt.bits != 8 or qt.group_size != -1 or not qt.symmetric:
                raise ValueError(f"{module}: int-quantized holds symmetric per-channel int8 weights")
            self.shards.add(name, (qt.codes.to(torch.int16) - 128).to(torch.int8))
        else:
            self.shards.add(name, qt.weight)
        self.shards.add(f"{module}.weight_scale", qt.scale)
        if getattr(qt, "input_scale", None) is not None:
            self.shards.add(f"{module}.input_scale", qt.input_scale)
        self.schemes[module] = dense_scheme(qt)

    def finish(self, ignore: list[str]) -> dict:
        self.shards.finish()
        return quantization_config(self.schemes, ignore, self.fmt)


def _read_dense(ckpt: Checkpoint, module: str, config: dict) -> QuantizedTensor | FP8Tensor:
    weights = scheme_for(module, config)["weights"]
    t = ckpt.load([f"{module}.{s}" for s in DENSE_SUFFIXES if f"{module}.{s}" in ckpt])
    weight, scale = t[f"{module}.weight"], t[f"{module}.weight_scale"]
    if weights["type"] == "int":
        codes = (weight.to(torch.int16) + 128).to(torch.uint8)
        return QuantizedTensor(codes, scale.reshape(-1, 1), None, 8, -1)
    block = tuple(weights["block_structure"]) if weights["strategy"] == "block" else None
    return FP8Tensor(weight, scale, block, t.get(f"{module}.input_scale"))
