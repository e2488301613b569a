"""AutoAWQ GEMM layout (`quant_method: awq`, `version: gemm`), as vLLM, SGLang and transformers (through
gptqmodel) read it.

Per quantized linear `X` (in input features, out output features, g the group size), layout of
AutoAWQ's WQLinear_GEMM, which must match exactly:
  X.qweight  int32 [in, out / 8]     4-bit codes packed along the OUTPUT dim, 8 per word, interleaved:
                                     nibble i (bits 4i..4i+3) of word c holds column 8c + AWQ_ORDER[i]
  X.qzeros   int32 [in / g, out / 8] zero points as raw unsigned codes (no -1), packed like qweight
  X.scales   fp16  [in / g, out]
Dequantization: (q - z) * s. GEMM kernels always read qzeros, so a symmetric tensor is written with
z = 8 everywhere and the config says zero_point: false. There is no act-order (g_idx) and no per-channel
variant: the kernels and vLLM take group_size from the config for every layer (-1 would be a negative
group count there), so only GROUP_SIZES are written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from qconvert.formats.bitpack import pack_bits, unpack_bits
from qconvert.formats.casting import cast_scale
from qconvert.formats.shards import DEFAULT_SHARD_BYTES, PlainTensors, ShardWriter, split_modules
from qconvert.model.checkpoint import Checkpoint
from qconvert.quantized import QuantizedTensor

QUANT_METHOD = "awq"
VERSION = "gemm"
BITS = 4
PACK = 32 // BITS  # codes per int32 word
GROUP_SIZES = (32, 64, 128)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ WQLinear_GEMM.from_linear order_map; vLLM's AWQ_REVERSE_ORDER undoes it
SYMMETRIC_ZERO = 1 << (BITS - 1)
SCALE_DTYPE = torch.float16
SUFFIXES = ("qweight", "qzeros", "scales")


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """uint8 4-bit codes [rows, cols] -> int32 [rows, cols / 8] in AWQ's interleaved nibble order."""
    rows, cols = codes.shape
    if cols % PACK:
        raise ValueError(f"AWQ packs {PACK} columns per word; {cols} columns do not divide")
    order = torch.tensor(AWQ_ORDER, device=codes.device)
    return pack_bits(codes.reshape(rows, -1, PACK)[:, :, order].reshape(rows, cols), BITS)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_awq: int32 [rows, words] -> uint8 [rows, words * 8]."""
    rows, words = packed.shape
    inverse = torch.argsort(torch.tensor(AWQ_ORDER))
    return unpack_bits(packed, BITS, words * PACK).reshape(rows, words, PACK)[:, :, inverse].reshape(rows, -1)


def quantization_config(group_size: int, zero_point: bool, modules_to_not_convert: list[str]) -> dict:
    return {
        "bits": BITS,
        "group_size": group_size,
        "modules_to_not_convert": list(modules_to_not_convert),
        "quant_method": QUANT_METHOD,
        "version": VERSION,
        "zero_point": zero_point,
    }


class Writer(PlainTensors):
    """Streams a model's tensors into AWQ GEMM safetensors shards.

    zero_point: False refuses asymmetric tensors and declares the checkpoint symmetric. Symmetric tensors
    also fit a zero_point=True checkpoint (qzeros 8, the same weights); prefer that for vLLM, whose fast
    awq_marlin path requires zero_point true (marlin has no plain uint4 without zero points) and which
    otherwise falls back to its unoptimized AWQ kernels.
    dtype: every non-quantized float tensor (embeddings, norms, lm_head, biases) is cast to it; AWQ
    kernels compute in fp16. Scales are always stored as fp16, whatever the QuantizedTensor held (bf16
    scales are rounded once more), so a read-back tensor dequantizes with those fp16 scales; quantize
    with scale_dtype=torch.float16 to make write -> read exact.
    """

    scale_dtype = SCALE_DTYPE

    def __init__(self, out_dir: Path, group_size: int, zero_point: bool = True, dtype: torch.dtype = torch.float16,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if group_size not in GROUP_SIZES:
            raise ValueError(f"AWQ group size {group_size} is not supported (choose from {GROUP_SIZES})")
        self.shards = ShardWriter(out_dir, max_shard_bytes)
        self.group_size, self.zero_point, self.dtype = group_size, zero_point, dtype


    def add_quantized(self, name: str, qt: QuantizedTensor) -> None:
        module = name.removesuffix(".weight")
        self._check(module, qt)
        zeros = qt.zeros()  # the midpoint 8 for a symmetric tensor
        self.shards.add(f"{module}.qweight", pack_awq(qt.codes.T.contiguous()))
        self.shards.add(f"{module}.qzeros", pack_awq(zeros.T.contiguous()))
        self.shards.add(f"{module}.scales", cast_scale(f"{module}.scales", qt.scale.T.contiguous(), SCALE_DTYPE))

    def _check(self, module: str, qt: QuantizedTensor) -> None:
        out, cols = qt.shape
        if qt.bits != BITS:
            raise ValueError(f"{module}: AWQ stores {BITS}-bit codes only, got {qt.bits}-bit")
        if qt.group_size != self.group_size:
            raise ValueError(f"{module}: group size {qt.group_size} differs from the checkpoint's {self.group_size}")
        if qt.g_idx is not None:
            raise ValueError(f"{module}: AWQ has no act-order (g_idx); write GPTQ with desc_act instead")
        if not self.zero_point and not qt.symmetric:
            raise ValueError(f"{module}: asymmetric tensor in a zero_point=False AWQ checkpoint")
        if out % PACK or cols % self.group_size:
            raise ValueError(f"{module}: AWQ needs out % {PACK} == 0 and in % group size == 0, got [{out}, {cols}]")

    def finish(self, modules_to_not_convert: list[str]) -> dict:
        """Close the shards; returns config.json's quantization_config.

        modules_to_not_convert: module name pieces left unquantized, e.g. ["lm_head", "mlp.gate"]. vLLM
        tests `piece in module_name` (a substring) and transformers a prefix, regex or suffix, so a piece
        must not also occur inside a quantized name ("mlp.gate" would catch a dense model's "mlp.gate_proj").
        """
        self.shards.finish()
        return quantization_config(self.group_size, self.zero_point, modules_to_not_convert)


def read(ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Every tensor of an AWQ GEMM checkpoint; quantized linears come back as QuantizedTensor with fp16 scales."""
    config = ckpt.config_dict["quantization_config"]
    version = str(config.get("version", VERSION)).lower()
    if version != VERSION or config.get("bits", BITS) != BITS:
        raise ValueError(f"AWQ {version} {config.get('bits')}-bit: only the {BITS}-bit {VERSION} layout is read")
    yield from split_modules(ckpt, "qweight", SUFFIXES, lambda module: _read_module(ckpt, module, config))


def _read_module(ckpt: Checkpoint, module: str, config: dict) -> QuantizedTensor:
    t = ckpt.load([f"{module}.{s}" for s in SUFFIXES])
    codes = unpack_awq(t[f"{module}.qweight"]).T.contiguous()
    zero = unpack_awq(t[f"{module}.qzeros"]).T.contiguous()
    scale = t[f"{module}.scales"].T.contiguous()
    group_size = config["group_size"]
    if scale.shape[1] * group_size != codes.shape[1]:
        raise ValueError(f"{module}: {scale.shape[1]} groups of {group_size} do not cover {codes.shape[1]} inputs")
    if not config.get("zero_point", True):
        if (zero != SYMMETRIC_ZERO).any():  # kernels differ on whether they read qzeros then
            raise ValueError(f"{module}: zero_point is false but qzeros are not all {SYMMETRIC_ZERO}")
        zero = None
    return QuantizedTensor(codes, scale, zero, BITS, group_size)
