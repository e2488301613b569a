"""A quantized GGUF file exactly as llama.cpp makes it: its converter to the lossless intermediate
type (the checkpoint's own dtype), then llama-quantize.

What llama-quantize changes relative to the converter's file (llama-quant.cpp,
llama_model_quantize_impl): tensors are re-ordered (quantizer_order), each quantizable tensor gets
its mixture type, the others keep the intermediate type, and general.quantization_version then
general.file_type are set again, which moves them to the end of the key list.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import time
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, LlamaFileType

from qconvert.errors import QConvertError
from qconvert.formats.gguf import quants
from qconvert.formats.gguf.convert import GGUFPlan, TensorSpec, encode_float, tensor_data
from qconvert.formats.gguf.convert.plan import OUTPUT_FILE_TYPES
from qconvert.formats.gguf.imatrix import Imatrix
from qconvert.formats.gguf.mixtures import ModelFacts, TensorInfo, quantizer_order, tensor_types

INTERMEDIATE = {torch.bfloat16: Q.BF16, torch.float16: Q.F16, torch.float32: Q.F32}
_ROUND = {Q.BF16: torch.bfloat16, Q.F16: torch.float16}
ERROR_ROWS = 256  # rows per tensor dequantized to measure its quantization error


@dataclass
class TensorRecord:
    """What one tensor became, for report.json."""

    type: str
    shape: list[int]  # GGUF order (columns first)
    bytes: int
    weight_error: float | None  # ||W - Q||^2 / ||W||^2: on up to ERROR_ROWS rows spread over the tensor, or
    # on every row where the layer-by-layer engine made the bytes
    seconds: float
    quantize_seconds: float = 0.0  # of which in the quantizer (the intermediate type's rounding included)


def sampled_error(encoded: np.ndarray, qtype: Q, values: torch.Tensor) -> float:
    """Relative squared error of the encoded tensor on evenly spaced rows (GGUF rows are independent)."""
    rows = values.reshape(-1, values.shape[-1])
    pick = torch.linspace(0, rows.shape[0] - 1, min(ERROR_ROWS, rows.shape[0])).round().long()
    raw = np.ascontiguousarray(encoded).view(np.uint8).reshape(rows.shape[0], -1)[pick.numpy()]
    approx = quants.dequantize(raw, qtype, (len(pick), rows.shape[1]))
    ref = rows[pick].float()
    return float((approx - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))


def model_facts(plan: GGUFPlan) -> ModelFacts:
    kv = {k: v for k, v, _ in plan.kv}

    def hp(key, default=0):
        value = kv.get(f"{plan.arch}.{key}", default)
        return int(value[0] if isinstance(value, (list, tuple)) else value)

    return ModelFacts(plan.arch, hp("block_count"), hp("attention.head_count"),
                      hp("attention.head_count_kv", hp("attention.head_count")), hp("expert_count"))


def imatrix_kv(imatrix: Imatrix, file: str | None) -> list[tuple]:
    """The keys llama-quantize adds when it is given an imatrix (its kv overrides, in that order;
    strings are cut to 127 bytes as there)."""
    string, u32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
    kv = [("quantize.imatrix.file", file[:127], string)] if file else []
    if imatrix.datasets:
        kv.append(("quantize.imatrix.dataset", imatrix.datasets[0][:127], string))
    kv.append(("quantize.imatrix.entries_count", len(imatrix.entries), u32))
    if imatrix.chunk_count > 0:
        kv.append(("quantize.imatrix.chunks_count", imatrix.chunk_count, u32))
    return kv


def quantized_kv(plan: GGUFPlan, intermediate: Q, ftype: LlamaFileType, extra: list[tuple] = ()) -> list[tuple]:
    """The converter's keys, then those llama-quantize sets again (which moves them to the end)."""
    again = [(gguf.Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32),
             (gguf.Keys.General.FILE_TYPE, int(ftype), gguf.GGUFValueType.UINT32), *extra]
    moved = {key for key, _, _ in again}
    kv = [item for item in plan.kv_for(OUTPUT_FILE_TYPES[intermediate.name]) if item[0] not in moved]
    return kv + again


def plan_types(plan: GGUFPlan, intermediate: Q, ftype: LlamaFileType, has_imatrix: bool) -> dict[str, Q]:
    infos = [TensorInfo(s.gguf_name, s.shape, Q.F32 if s.is_1d_f32 else intermediate) for s in plan.tensors]
    return tensor_types(infos, ftype, model_facts(plan), has_imatrix)


def _imatrix_for(spec: TensorSpec, imatrix: Imatrix | None) -> torch.Tensor | None:
    if imatrix is None:
        return None
    values = imatrix.values(spec.gguf_name)
    if values is None:
        return None
    n_mat = spec.shape[2] if len(spec.shape) == 3 else 1
    if values.size != spec.shape[0] * n_mat:
        raise QConvertError(f"imatrix entry {spec.gguf_name} has {values.size} values, the tensor needs "
                            f"{spec.shape[0] * n_mat} ({n_mat} x {spec.shape[0]})")
    return torch.from_numpy(values).reshape(n_mat, spec.shape[0])


def read_values(spec: TensorSpec, loader: Callable[[str], torch.Tensor], intermediate: Q) -> tuple[torch.Tensor, bool]:
    """The tensor's values (float32, or the stored dtype where they are only moved), and whether they
    already lie on the intermediate type's grid (moved, not computed, from tensors stored in that type),
    where llama-quantize's rounding changes nothing."""
    dtypes = []

    def recording(name: str) -> torch.Tensor:
        t = loader(name)
        dtypes.append(t.dtype)
        return t

    values = tensor_data(spec, recording, as_stored=True)
    return values, spec.moves_only and bool(dtypes) and all(d == _ROUND.get(intermediate) for d in dtypes)


def encode(spec: TensorSpec, data: torch.Tensor, qtype: Q, intermediate: Q, imatrix: Imatrix | None,
           device: torch.device, threads: int | None = None, on_grid: bool = False) -> np.ndarray:
    """The tensor's bytes in qtype, computed from its values in the intermediate type (on_grid: data
    already holds them, see read_values)."""
    if qtype in (Q.F32, Q.F16, Q.BF16) and (qtype == intermediate or qtype == Q.F32):
        return encode_float(data, qtype)
    data = data.to(device)
    if intermediate in _ROUND and not on_grid:  # llama-quantize reads the intermediate file's rounded values
        data = data.to(_ROUND[intermediate])
    data = data.float()
    mats = data.reshape(-1, data.shape[-2], data.shape[-1])
    weights = _imatrix_for(spec, imatrix)
    out = []
    for i, w in enumerate(mats):  # one matrix (expert) at a time, each with its own importance
        im = None if weights is None else weights[i].to(device)
        out.append(quants.quantize(w, qtype, im, threads).cpu())
    return torch.cat(out).numpy()


def encode_tensors(specs: list[TensorSpec], loader: Callable[[str], torch.Tensor], types: dict[str, Q],
                   intermediate: Q, device: torch.device, threads: int | None = None) -> dict[str, tuple]:
    """{GGUF name: (bytes, relative squared error)} of specs, read and quantized without an imatrix, for `write`'s
    `encoded`. On a GPU, on a stream of its own: a caller runs this beside other GPU work."""
    side = torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()
    made = {}
    with side:
        for spec in specs:
            qtype = types[spec.gguf_name]
            values, on_grid = read_values(spec, loader, intermediate)
            data = encode(spec, values, qtype, intermediate, None, device, threads, on_grid)
            made[spec.gguf_name] = (data, sampled_error(data, qtype, values))
    return made


def open_file(plan: GGUFPlan, out_path: Path, ftype: LlamaFileType, intermediate: Q, types: dict[str, Q],
              imatrix: Imatrix | None = None, imatrix_file: str | None = None) -> gguf.GGUFWriter:
    """The file with everything before the tensor data written: header, metadata (the vocabulary's packing
    takes a second for a large one) and the tensors' names, types and shapes."""
    writer = gguf.GGUFWriter(str(out_path), arch=plan.arch)
    extra = imatrix_kv(imatrix, imatrix_file) if imatrix is not None else []
    for key, value, vtype in quantized_kv(plan, intermediate, ftype, extra):
        if key != gguf.Keys.General.ARCHITECTURE:  # GGUFWriter wrote it first, as the converter does
            writer.add_key_value(key, value, vtype)
    for spec in _order(plan):
        qtype = types[spec.gguf_name]
        writer.add_tensor_info(spec.gguf_name, spec.torch_shape, np.dtype(np.float32),
                               quants.row_bytes(qtype, spec.shape[0]) * (spec.n_elements // spec.shape[0]),
                               raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    return writer


def _order(plan: GGUFPlan) -> list[TensorSpec]:
    by_name = {s.gguf_name: s for s in plan.tensors}
    return [by_name[n] for n in quantizer_order(list(by_name))]


def write(plan: GGUFPlan, loader: Callable[[str], torch.Tensor], out_path: Path, ftype: LlamaFileType,
          intermediate: Q, imatrix: Imatrix | None = None, imatrix_file: str | None = None,
          device: torch.device = torch.device("cpu"),
          on_tensor: Callable[[str, Q], None] = lambda name, qtype: None,
          types: dict[str, Q] | None = None,
          encoded: Callable[[TensorSpec], tuple[np.ndarray, float] | None] = lambda spec: None,
          threads: int | None = None, writer: gguf.GGUFWriter | None = None) -> dict[str, TensorRecord]:
    """Write the quantized file; returns what every tensor became. imatrix_file: the path to record in
    the file's metadata, as the user gave it to llama-quantize. types: each tensor's type, when already
    chosen; encoded: a tensor's bytes and relative squared error when a calibrated algorithm made them
    (None: read and quantized here); threads: the CPU quantizers' threads (None: every core); writer: the
    file as `open_file` left it, when a caller opened it already."""
    types = types or plan_types(plan, intermediate, ftype, imatrix is not None)
    writer = writer or open_file(plan, out_path, ftype, intermediate, types, imatrix, imatrix_file)
    order = _order(plan)
    records = {}
    # the next tensor is read (and permuted) while this one is quantized: the C quantizers release the GIL
    with ThreadPoolExecutor(1, thread_name_prefix="gguf-read") as reader:
        upcoming = [reader.submit(_fetch, spec, loader, intermediate, encoded) for spec in order[:1]]
        for i, spec in enumerate(order):
            start = time.perf_counter()
            fetched = upcoming.pop().result()
            if i + 1 < len(order):
                upcoming.append(reader.submit(_fetch, order[i + 1], loader, intermediate, encoded))
            records[spec.gguf_name] = _write_tensor(writer, spec, fetched, types[spec.gguf_name], intermediate,
                                                    imatrix, device, threads, start)
            on_tensor(spec.gguf_name, types[spec.gguf_name])
    writer.close()
    return records


def _fetch(spec: TensorSpec, loader, intermediate: Q, encoded) -> tuple:
    """(bytes and error an algorithm made, None, False), or (None, values, on_grid) to quantize here: a
    tensor the engine made is not read again."""
    made = encoded(spec)
    return (made, None, False) if made is not None else (None, *read_values(spec, loader, intermediate))


def _write_tensor(writer: gguf.GGUFWriter, spec: TensorSpec, fetched: tuple, qtype: Q, intermediate: Q,
                  imatrix: Imatrix | None, device: torch.device, threads: int | None, start: float) -> TensorRecord:
    made, values, on_grid = fetched
    quantizing = time.perf_counter()
    if made is None:
        data = encode(spec, values, qtype, intermediate, imatrix, device, threads, on_grid)
        quantized = time.perf_counter()
        error = sampled_error(data, qtype, values)
    else:
        (data, error), quantized = made, quantizing
    writer.write_tensor_data(data)
    return TensorRecord(qtype.name, list(spec.shape), data.nbytes, error, round(time.perf_counter() - start, 4),
                        round(quantized - quantizing, 4))
