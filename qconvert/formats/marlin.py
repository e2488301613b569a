"""Marlin layout (`quant_method: gptq`, `checkpoint_format: marlin`): symmetric 4-bit weights in the tile
order the Marlin FP16xINT4 kernel reads straight into tensor-core fragments, as AutoGPTQ (use_marlin) and
vLLM's `marlin` method read it.

Tile layout: IST-DASLab/marlin `Layer.pack` (marlin/__init__.py), implemented here from its description.
Per quantized linear `X` (k input features, n output features, G groups):
  X.B  int32 [k / 16, n * 16 / 8]  the weight as [k, n], cut into 16x16 tiles; each row of B holds one
                                   row of n / 16 tiles, every tile flattened row-major (k-offset * 16 +
                                   n-offset), then each run of 4 tiles (1024 values) reordered by
                                   TILE_PERM: lane t of a warp gets, per tile and per n8 half, the 4 values
                                   of the m16n8k16 B fragment it holds (k rows 2(t%4), +1, +8, +9 of
                                   column t/4), with the 8 values of one word interleaved 0,2,4,6,1,3,5,7
                                   so one shift-and-mask yields two fp16 pairs. 8 codes per word, value i
                                   at bits 4i.
  X.s  fp16  [G, n]                the scales; each row reordered in runs of 64 by SCALE_PERM (grouped)
                                   or in runs of 32 by SCALE_PERM_SINGLE (one group: the kernel applies
                                   it to the output fragments instead)
Dequantization: (q - 8) * s; the zero point is fixed, so only symmetric tensors fit. G is 1 (per channel)
or k / 128; the kernel infers the group size from s.shape[0] (one row = per channel), so a group-128
layer with k = 128 is stored like a per-channel one. The kernel needs k % 128 == 0 and n % 256 == 0
(its smallest thread tile), and has no act-order (g_idx).
quantize_config.json beside the weights repeats config.json's quantization_config (AutoGPTQ reads it;
AutoGPTQ 0.7 looks for is_marlin_format, vLLM for either key).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from qconvert.errors import QConvertError
from qconvert.formats.bitpack import pack_bits, unpack_bits
from qconvert.formats.casting import cast_scale
from qconvert.formats.shards import DEFAULT_SHARD_BYTES, PlainTensors, ShardWriter, split_modules
from qconvert.model.checkpoint import Checkpoint
from qconvert.quantized import QuantizedTensor

QUANT_METHOD = "gptq"
CHECKPOINT_FORMAT = "marlin"
BITS = 4
GROUP_SIZES = (128, -1)
TILE = 16
MIN_K, MIN_N = 128, 256  # the kernel's smallest thread tile: k % 128 and n % 256
ZERO = 1 << (BITS - 1)
SCALE_DTYPE = torch.float16
SUFFIXES = ("B", "s")
QUANTIZE_CONFIG = "quantize_config.json"


def _tile_perm() -> torch.Tensor:
    """TILE_PERM[j] = the position (within 4 flattened 16x16 tiles) of the value stored j-th."""
    lane = torch.arange(32)[:, None, None, None]
    tile = torch.arange(4)[None, :, None, None]
    half = torch.arange(2)[None, None, :, None]  # the n8 half of a 16-wide tile
    k_off = torch.tensor([0, 1, 8, 9])[None, None, None, :]  # the B fragment's k rows, from 2 * (lane % 4)
    row = 2 * (lane % 4) + k_off
    col = lane // 4 + 8 * half
    perm = (256 * tile + 16 * row + col).reshape(-1, 8)  # [lane * tile, 8 values of one word]
    return perm[:, [0, 2, 4, 6, 1, 3, 5, 7]].reshape(-1)


TILE_PERM = _tile_perm()
# grouped scales: each run of 64 read as [8, 8] and transposed
SCALE_PERM = torch.arange(64).reshape(8, 8).T.reshape(-1)
# one group: per 32, columns (0, 1, 8, 9, 16, 17, 24, 25) + 2i for i = 0..3
SCALE_PERM_SINGLE = (torch.tensor([0, 1, 8, 9, 16, 17, 24, 25])[None, :] + 2 * torch.arange(4)[:, None]).reshape(-1)


def shape_problem(out: int, cols: int) -> str | None:
    """Why the Marlin kernel cannot take a [out, cols] weight, or None."""
    if cols % MIN_K or out % MIN_N:
        return (f"Marlin needs in % {MIN_K} == 0 and out % {MIN_N} == 0 (the kernel's smallest tile), "
                f"got out {out}, in {cols}")
    return None


def pack_weight(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n, k] (logical [out, in]) -> B int32 [k / 16, n * 2]."""
    n, k = codes.shape
    w = codes.T.reshape(k // TILE, TILE, n // TILE, TILE).permute(0, 2, 1, 3).reshape(k // TILE, n * TILE)
    perm = TILE_PERM.to(codes.device)
    w = w.reshape(-1, perm.numel())[:, perm].reshape(k // TILE, n * TILE)
    return pack_bits(w.contiguous(), BITS)


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_weight: B int32 [k / 16, n * 2] -> uint8 codes [n, k]."""
    rows, words = packed.shape
    k, n = rows * TILE, words * 32 // BITS // TILE
    w = unpack_bits(packed, BITS, words * 32 // BITS)
    inverse = torch.argsort(TILE_PERM).to(packed.device)
    w = w.reshape(-1, inverse.numel())[:, inverse].reshape(k // TILE, n // TILE, TILE, TILE)
    return w.permute(0, 2, 1, 3).reshape(k, n).T.contiguous()


def _scale_perm(groups: int) -> torch.Tensor:
    return SCALE_PERM if groups > 1 else SCALE_PERM_SINGLE


def pack_scale(scale: torch.Tensor) -> torch.Tensor:
    """scale [n, G] -> s [G, n] in the kernel's order."""
    s = scale.T.contiguous()
    perm = _scale_perm(s.shape[0]).to(s.device)
    return s.reshape(-1, perm.numel())[:, perm].reshape(s.shape).contiguous()


def unpack_scale(s: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_scale: s [G, n] -> scale [n, G]."""
    inverse = torch.argsort(_scale_perm(s.shape[0])).to(s.device)
    return s.reshape(-1, inverse.numel())[:, inverse].reshape(s.shape).T.contiguous()


def quantization_config(group_size: int) -> dict:
    return {
        "bits": BITS, "checkpoint_format": CHECKPOINT_FORMAT, "desc_act": False, "group_size": group_size,
        "is_marlin_format": True, "quant_method": QUANT_METHOD, "sym": True,
    }


def is_marlin(qc: dict | None) -> bool:
    """Whether a quantization_config describes this layout (either key, as vLLM tests it)."""
    qc = qc or {}
    return qc.get("checkpoint_format") == CHECKPOINT_FORMAT or bool(qc.get("is_marlin_format")) \
        or qc.get("quant_method") == "marlin"


def check_shapes(ckpt: Checkpoint, arch) -> None:
    """Refuse, before anything is written, linears to quantize that the kernel cannot take (names the first,
    counts the others), from the checkpoint's headers."""
    misfits = []
    for name, shape in arch.quantized_weights(ckpt):
        problem = shape_problem(*shape)
        if problem:
            misfits.append((name.removesuffix(".weight"), problem))
    if misfits:
        name, problem = misfits[0]
        others = f" ({len(misfits) - 1} other linears do not fit either)" if len(misfits) > 1 else ""
        raise QConvertError(f"{name}: {problem}{others}; use --format gptq or compressed-tensors")


class Writer(PlainTensors):
    """Streams a model's tensors into Marlin safetensors shards; every quantized tensor must be symmetric
    4-bit with the checkpoint's group size (128 or -1) and no g_idx.

    dtype: every non-quantized float tensor is cast to it (the kernel computes in fp16). Scales are stored
    as fp16; quantize with scale_dtype=torch.float16 (the engine reads `scale_dtype`) for an exact round trip.
    """

    scale_dtype = SCALE_DTYPE

    def __init__(self, out_dir: Path, group_size: int, dtype: torch.dtype = torch.float16,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if group_size not in GROUP_SIZES:
            raise ValueError(f"Marlin group size {group_size} is not supported (choose from {GROUP_SIZES})")
        self.out_dir = Path(out_dir)
        self.shards = ShardWriter(out_dir, max_shard_bytes)
        self.group_size, self.dtype = group_size, dtype


    def add_quantized(self, name: str, qt: QuantizedTensor) -> None:
        module = name.removesuffix(".weight")
        self._check(module, qt)
        self.shards.add(f"{module}.B", pack_weight(qt.codes))
        self.shards.add(f"{module}.s", pack_scale(cast_scale(f"{module}.s", qt.scale, SCALE_DTYPE)))

    def _check(self, module: str, qt: QuantizedTensor) -> None:
        if qt.bits != BITS or not qt.symmetric:
            raise ValueError(f"{module}: Marlin stores symmetric {BITS}-bit codes only, got "
                             f"{'symmetric' if qt.symmetric else 'asymmetric'} {qt.bits}-bit")
        if qt.group_size != self.group_size:
            raise ValueError(f"{module}: group size {qt.group_size} differs from the checkpoint's {self.group_size}")
        if qt.g_idx is not None:
            raise ValueError(f"{module}: Marlin has no act-order (g_idx); use static groups")
        problem = shape_problem(*qt.shape)
        if problem:
            raise ValueError(f"{module}: {problem}")

    def finish(self) -> dict:
        """Close the shards and write quantize_config.json; returns config.json's quantization_config."""
        self.shards.finish()
        config = quantization_config(self.group_size)
        (self.out_dir / QUANTIZE_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return config


def read(ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Every tensor of a Marlin checkpoint; quantized linears come back as symmetric 4-bit QuantizedTensor."""
    config = ckpt.config_dict["quantization_config"]
    if config.get("bits", BITS) != BITS or config.get("group_size", 128) not in GROUP_SIZES:
        raise ValueError(f"Marlin {config.get('bits')}-bit group {config.get('group_size')}: only {BITS}-bit "
                         f"groups of {' or '.join(map(str, GROUP_SIZES))} exist")
    yield from split_modules(ckpt, "B", SUFFIXES, lambda module: _read_module(ckpt, module, config))


def _read_module(ckpt: Checkpoint, module: str, config: dict) -> QuantizedTensor:
    t = ckpt.load([f"{module}.{s}" for s in SUFFIXES])
    codes = unpack_weight(t[f"{module}.B"])
    scale = unpack_scale(t[f"{module}.s"])
    group_size = config.get("group_size", 128)
    cols = codes.shape[1]
    groups = 1 if group_size == -1 else cols // group_size
    if scale.shape[1] != groups or scale.shape[0] != codes.shape[0]:
        raise ValueError(f"{module}: s {tuple(t[f'{module}.s'].shape)} does not fit B for [{codes.shape[0]}, {cols}] "
                         f"in groups of {group_size}")
    return QuantizedTensor(codes, scale, None, BITS, group_size)
