"""Write an RTN-quantized copy of a (tiny) checkpoint straight through a format writer, for tests and
consumer checks of the AWQ, GPTQ and compressed-tensors layouts without going through the engine."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from qconvert.algorithms.rtn import grouped, minmax_params, quantize_with
from qconvert.formats import awq, compressed_tensors, gptq
from qconvert.model.checkpoint import Checkpoint
from qconvert.output import copy_aux_files, write_config
from qconvert.quantized import QuantizedTensor

# the block linears of the dense families (llama, qwen2, ...): everything else is written as is
_BLOCK_LINEAR = re.compile(r".*\.layers\.\d+\..*_proj\.weight$")


def act_order_g_idx(cols: int, group_size: int, seed: int) -> torch.Tensor:
    """A GPTQ-style act-order g_idx: columns visited in a random order, group_size at a time."""
    perm = torch.randperm(cols, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[perm] = (torch.arange(cols) // group_size).to(torch.int32)
    return g_idx


def rtn_any_bits(w: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype,
                 g_idx: torch.Tensor | None = None) -> QuantizedTensor:
    """rtn() from the same min-max pieces, for any bit width (RTNConfig admits 4 and 8 only); with g_idx,
    over the groups it defines: the columns are quantized sorted by group, then put back."""
    perm = torch.arange(w.shape[1]) if g_idx is None else torch.argsort(g_idx.long(), stable=True)
    wp = w[:, perm].float()
    scale, zero = minmax_params(grouped(wp, group_size), bits, sym, scale_dtype)
    codes = quantize_with(wp, scale, zero, bits, group_size)[:, torch.argsort(perm)].contiguous()
    return QuantizedTensor(codes, scale, zero, bits, group_size, g_idx)


def _writer(fmt: str, out: Path, bits: int, group_size: int, sym: bool, act_order: bool):
    if fmt == "awq":
        return awq.Writer(out, group_size, zero_point=not sym)
    if fmt == "gptq":
        return gptq.Writer(out, bits, group_size, sym, desc_act=act_order)
    if fmt == "compressed-tensors":
        return compressed_tensors.Writer(out)
    raise ValueError(f"unknown format {fmt!r}")


def _finish(fmt: str, writer) -> dict:
    if fmt == "awq":
        return writer.finish(["lm_head"])
    if fmt == "gptq":
        return writer.finish()
    return writer.finish(["lm_head"])


def write_rtn_checkpoint(src: Path, out: Path, fmt: str, bits: int = 4, group_size: int = 128, sym: bool = True,
                         act_order_seed: int | None = None, scale_dtype: torch.dtype = torch.float16) -> Path:
    """RTN-quantize every block linear of `src` into `out` in format `fmt` (awq, gptq, compressed-tensors);
    act_order_seed gives each linear a random act-order g_idx. Returns out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(src)
    writer = _writer(fmt, out, bits, group_size, sym, act_order_seed is not None)
    for i, name in enumerate(ckpt.names()):
        t = ckpt.get(name)
        if not _BLOCK_LINEAR.match(name):
            writer.add_tensor(name, t)
            continue
        g_idx = None if act_order_seed is None else act_order_g_idx(t.shape[1], group_size, act_order_seed + i)
        writer.add_quantized(name, rtn_any_bits(t, bits, group_size, sym, scale_dtype, g_idx))
    write_config(ckpt.config_dict, out, _finish(fmt, writer))
    copy_aux_files(Path(src), out)
    return out
