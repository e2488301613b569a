"""A reference GGUF writer for the float output types (F32 / F16 / BF16), one tensor in memory at a time.

Float conversion matches llama.cpp's converter bit for bit: F16 as numpy's float32 -> float16 cast
(IEEE round to nearest even, overflow to inf), BF16 as ggml's fp32 -> bf16 rule (round to nearest even
on the upper 16 bits, NaN made quiet; torch's cast plus a NaN fix-up), F32 as is. The `tensor_type` /
`encode` / `file_type` arguments let other output types reuse the writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from .plan import OUTPUT_FILE_TYPES, GGUFPlan
from .tensors import Loader, TensorSpec, tensor_data

FLOAT_TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}


def bf16_bits(data: torch.Tensor | np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16) with ggml's rule: round to nearest even on the upper
    16 bits, NaN kept (sign and upper payload) and made quiet. torch's cast is the same rounding for
    every non-NaN value (checked bit for bit against gguf-py's BF16 quantizer); NaN lanes are redone."""
    t = torch.as_tensor(data, dtype=torch.float32).contiguous()
    out = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = torch.isnan(t)
    if bool(nan.any()):
        u = t.view(torch.int32).numpy().view(np.uint32)
        mask = nan.numpy()
        out = out.copy()
        out[mask] = ((u[mask] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return out


def encode_float(data: torch.Tensor, qtype: Q) -> np.ndarray:
    """F32 as is; F16 by numpy's astype(float16) like llama.cpp (torch's cast rounds the same but
    spells NaNs differently); BF16 by bf16_bits."""
    t = data.detach().to("cpu", torch.float32).contiguous()
    if qtype == Q.F32:
        return t.numpy()
    if qtype == Q.F16:
        with np.errstate(over="ignore"):
            return t.numpy().astype(np.float16)
    if qtype == Q.BF16:
        return bf16_bits(t)
    raise ValueError(f"encode_float does not produce {qtype.name}")


def tensor_nbytes(spec: TensorSpec, qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if spec.shape[0] % block:
        raise ValueError(f"{spec.gguf_name}: row of {spec.shape[0]} is not a multiple of {qtype.name}'s block {block}")
    return spec.n_elements // block * size


def write_gguf(plan: GGUFPlan, loader: Loader, out_path: str | Path, out_type: str = "F16", *,
               tensor_type: Callable[[TensorSpec], Q] | None = None,
               encode: Callable[[TensorSpec, torch.Tensor, Q], np.ndarray] | None = None,
               file_type: int | None = None) -> Path:
    """Write plan as a GGUF file. out_type F32/F16/BF16 picks the type of every tensor that is not
    forced to F32 and general.file_type, as llama.cpp's `--outtype` does; tensor_type / encode /
    file_type override those choices (encode returns the tensor's bytes as an array of any dtype)."""
    out_path = Path(out_path)
    default = FLOAT_TYPES[out_type.upper()]
    if file_type is None:
        file_type = OUTPUT_FILE_TYPES[out_type.upper()]
    types = [tensor_type(s) if tensor_type else (Q.F32 if s.is_1d_f32 else default) for s in plan.tensors]
    writer = gguf.GGUFWriter(out_path, arch=plan.arch)
    for key, value, vtype in plan.kv_for(file_type):
        if key == gguf.Keys.General.ARCHITECTURE and value == plan.arch:
            continue  # GGUFWriter already wrote it
        writer.add_key_value(key, value, vtype)
    for spec, qtype in zip(plan.tensors, types):
        writer.add_tensor_info(spec.gguf_name, spec.torch_shape, np.dtype(np.float32), tensor_nbytes(spec, qtype),
                               raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for spec, qtype in zip(plan.tensors, types):
        data = tensor_data(spec, loader)
        arr = encode(spec, data, qtype) if encode else encode_float(data, qtype)
        del data
        writer.write_tensor_data(arr)
    writer.close()
    return out_path
