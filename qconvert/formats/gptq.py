"""GPTQ v1 layout (`quant_method: gptq`, `checkpoint_format: gptq`), as vLLM and transformers (through
gptqmodel) read it.

Per quantized linear `X` (in input features, out output features, b bits, G groups), layout of the
original GPTQ / AutoGPTQ QuantLinear.pack, which must match exactly:
  X.qweight  int32 [in * b / 32, out]  codes packed along the INPUT dim: element i of a word at bits
                                       [i*b, (i+1)*b); for b = 3, 32 values fill 3 words densely
  X.qzeros   int32 [G, out * b / 32]   zero points MINUS ONE (the v1 convention), packed along the output dim
  X.scales   fp16  [G, out]
  X.g_idx    int32 [in]                the group of each input column: column // group_size, or
                                       GPTQ's act-order assignment when desc_act
Dequantization: (q - (stored_zero + 1)) * s. A zero point of 0 cannot be stored (0 - 1 wraps to 2**b - 1,
which reads back as 2**b). group_size -1 is per channel: one group.
quantize_config.json beside the weights repeats config.json's quantization_config (AutoGPTQ read it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from qconvert.formats.bitpack import pack_bits, unpack_bits
from qconvert.formats.casting import cast_scale
from qconvert.formats.shards import DEFAULT_SHARD_BYTES, PlainTensors, ShardWriter, split_modules
from qconvert.model.checkpoint import Checkpoint
from qconvert.quantized import QuantizedTensor

QUANT_METHOD = "gptq"
CHECKPOINT_FORMAT = "gptq"  # v1; "gptq_v2" (gptqmodel) stores raw zero points
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # stored zero = zero - offset
BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
QUANTIZE_CONFIG = "quantize_config.json"


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [rows, cols] -> int32 [rows * bits / 32, cols], packed down each column."""
    return pack_bits(codes.T.contiguous(), bits).T.contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of pack_rows."""
    return unpack_bits(packed.T.contiguous(), bits, rows).T.contiguous()


def default_g_idx(cols: int, group_size: int) -> torch.Tensor:
    """The g_idx of a tensor quantized in column order."""
    if group_size == -1:
        return torch.zeros(cols, dtype=torch.int32)
    return (torch.arange(cols) // group_size).to(torch.int32)


class Writer(PlainTensors):
    """Streams a model's tensors into GPTQ v1 safetensors shards; the constructor arguments are the
    checkpoint-wide quantize config, and every tensor added must agree with them.

    desc_act: tensors may carry an act-order g_idx (each group must hold group_size columns, as GPTQ
    makes it); without desc_act vLLM ignores g_idx, so a tensor with one is refused.
    dtype: every non-quantized float tensor is cast to it. Scales are always stored as fp16 (bf16 scales
    are rounded once more), so a read-back tensor dequantizes with those fp16 scales.
    damp_percent, static_groups, true_sequential: recorded in the config only.
    """

    scale_dtype = SCALE_DTYPE

    def __init__(self, out_dir: Path, bits: int, group_size: int, sym: bool, desc_act: bool = False,
                 damp_percent: float = 0.01, static_groups: bool = False, true_sequential: bool = True,
                 dtype: torch.dtype = torch.float16, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if bits not in BITS:
            raise ValueError(f"GPTQ bits {bits} is not supported (choose from {BITS})")
        self.out_dir = Path(out_dir)
        self.shards = ShardWriter(out_dir, max_shard_bytes)
        self.dtype = dtype
        self.config = {
            "bits": bits, "checkpoint_format": CHECKPOINT_FORMAT, "damp_percent": damp_percent,
            "desc_act": desc_act, "group_size": group_size, "quant_method": QUANT_METHOD,
            "static_groups": static_groups, "sym": sym, "true_sequential": true_sequential,
        }


    def add_quantized(self, name: str, qt: QuantizedTensor) -> None:
        module = name.removesuffix(".weight")
        self._check(module, qt)
        zeros = qt.zeros()
        if (zeros < ZERO_OFFSET[CHECKPOINT_FORMAT]).any():
            raise ValueError(f"{module}: a zero point of 0 cannot be stored in GPTQ v1 (zero - 1 wraps)")
        stored = zeros - ZERO_OFFSET[CHECKPOINT_FORMAT]
        g_idx = qt.g_idx if qt.g_idx is not None else default_g_idx(qt.shape[1], qt.group_size)
        self.shards.add(f"{module}.qweight", pack_rows(qt.codes.T, qt.bits))
        self.shards.add(f"{module}.qzeros", pack_bits(stored.T.contiguous(), qt.bits))
        self.shards.add(f"{module}.scales", cast_scale(f"{module}.scales", qt.scale.T.contiguous(), SCALE_DTYPE))
        self.shards.add(f"{module}.g_idx", g_idx.to(torch.int32))

    def _check(self, module: str, qt: QuantizedTensor) -> None:
        c = self.config
        out, cols = qt.shape
        if (qt.bits, qt.group_size) != (c["bits"], c["group_size"]):
            raise ValueError(f"{module}: {qt.bits}-bit group {qt.group_size} differs from the checkpoint's "
                             f"{c['bits']}-bit group {c['group_size']}")
        if c["sym"] and not qt.symmetric:
            raise ValueError(f"{module}: asymmetric tensor in a sym=True GPTQ checkpoint")
        if (cols * qt.bits) % 32 or (out * qt.bits) % 32 or (qt.group_size != -1 and cols % qt.group_size):
            raise ValueError(f"{module}: GPTQ {qt.bits}-bit needs in and out to fill whole int32 words and "
                             f"in % group size == 0, got [{out}, {cols}]")
        if qt.g_idx is not None:
            if not c["desc_act"]:
                raise ValueError(f"{module}: tensor has an act-order g_idx but the checkpoint has desc_act=False")
            sizes = torch.bincount(qt.g_idx.long(), minlength=qt.num_groups)
            if len(sizes) != qt.num_groups or (qt.group_size != -1 and (sizes != qt.group_size).any()):
                raise ValueError(f"{module}: act-order g_idx must put exactly {qt.group_size} columns in each group")

    def finish(self, modules_in_block_to_quantize: list[list[str]] | None = None) -> dict:
        """Close the shards and write quantize_config.json; returns config.json's quantization_config.

        GPTQ consumers quantize every linear inside the decoder blocks (never lm_head or embeddings).
        Where a block also holds linears left dense (an MoE router gate), pass the ones that are
        quantized, as name suffixes in true-sequential groups (optimum and vLLM read this key):
        [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ...].
        """
        self.shards.finish()
        config = dict(self.config)
        if modules_in_block_to_quantize is not None:
            config["modules_in_block_to_quantize"] = modules_in_block_to_quantize
        (self.out_dir / QUANTIZE_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return config


def read(ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Every tensor of a GPTQ checkpoint; quantized linears come back as QuantizedTensor with fp16 scales
    and a g_idx only where it is not column // group_size."""
    config = ckpt.config_dict["quantization_config"]
    fmt = config.get("checkpoint_format", CHECKPOINT_FORMAT)
    if fmt not in ZERO_OFFSET or config["bits"] not in BITS:
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} {config['bits']}-bit is not read")
    yield from split_modules(ckpt, "qweight", SUFFIXES,
                             lambda module: _read_module(ckpt, module, config, ZERO_OFFSET[fmt]))


def _read_module(ckpt: Checkpoint, module: str, config: dict, zero_offset: int) -> QuantizedTensor:
    bits, group_size = config["bits"], config["group_size"]
    t = ckpt.load([f"{module}.{s}" for s in SUFFIXES if f"{module}.{s}" in ckpt])
    scale = t[f"{module}.scales"].T.contiguous()
    out = scale.shape[0]
    cols = t[f"{module}.qweight"].shape[0] * 32 // bits
    codes = unpack_rows(t[f"{module}.qweight"], bits, cols).T.contiguous()
    zero = unpack_bits(t[f"{module}.qzeros"], bits, out).T.to(torch.int16) + zero_offset
    if (zero >= 1 << bits).any():  # v1 kernels add 1 to the b-bit field: a stored 2**b - 1 means zero 2**b
        raise ValueError(f"{module}: qzeros hold {(1 << bits) - 1}, which v1 kernels read as zero point {1 << bits}")
    trivial = default_g_idx(cols, group_size)
    g_idx = t.get(f"{module}.g_idx", trivial).to(torch.int32)
    if torch.equal(g_idx, trivial):
        g_idx = None
    elif not config.get("desc_act", False):  # vLLM ignores g_idx then, gptqmodel does not
        raise ValueError(f"{module}: g_idx is not column // group_size but desc_act is false")
    if config.get("sym", True):
        if (zero != 1 << (bits - 1)).any():  # marlin assumes the midpoint, exllama reads qzeros
            raise ValueError(f"{module}: sym is true but the zero points are not all {1 << (bits - 1)}")
        return QuantizedTensor(codes, scale, None, bits, group_size, g_idx)
    return QuantizedTensor(codes, scale, zero.to(torch.uint8), bits, group_size, g_idx)
