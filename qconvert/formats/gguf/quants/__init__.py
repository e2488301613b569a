"""llama.cpp's GGUF block quantizers in PyTorch, byte-identical to ggml_quantize_chunk.

`quantize(w, qtype, imatrix)` follows the code path ggml_quantize_chunk takes for the same
arguments (the *_ref routines without an imatrix, the importance-weighted *_impl ones with it)
and reproduces its float32 arithmetic operation by operation (sequential sums, no fused
multiply-add, correctly rounded sqrt, ggml's nearest_int and C's float->int conversions as
compiled for x86). The same bytes come out on CPU and CUDA.

Scope of the guarantee: finite inputs. On the CPU the bytes also match in blocks whose
intermediate values overflow or underflow (|x| ~ 1e30, subnormals); on CUDA such a block can
differ where ggml's result depends on x86's NaN sign and payload rules (an imatrix path whose
squares or weights overflow to inf). NaN/inf inputs: F32/F16/BF16 exact; block types undefined.

Modules: floats (F32/F16/BF16), legacy (Q4_0..Q8_0), kquants (Q2_K..Q6_K), search (the scale
searches they share), common (exact-arithmetic helpers); native (the same block quantizers in C,
built for the CPU and, with nvcc, for CUDA: what `quantize` runs when a compiler is there; the PyTorch
ones are the fallback and what the GGUF GPTQ rounding hook builds on).
"""

from __future__ import annotations

import contextlib
import threading

import gguf
import numpy as np
import torch

from . import dequant, floats, kquants, legacy, native

T = gguf.GGMLQuantizationType

_QUANTIZERS = {
    T.F32: floats.f32,
    T.F16: floats.f16,
    T.BF16: floats.bf16,
    T.Q8_0: legacy.q8_0,
    T.Q4_0: legacy.q4_0,
    T.Q4_1: legacy.q4_1,
    T.Q5_0: legacy.q5_0,
    T.Q5_1: legacy.q5_1,
    T.Q2_K: kquants.q2_K,
    T.Q3_K: kquants.q3_K,
    T.Q4_K: kquants.q4_K,
    T.Q5_K: kquants.q5_K,
    T.Q6_K: kquants.q6_K,
}

SUPPORTED = tuple(_QUANTIZERS)

# Elements per chunk of rows. On the GPU: large, to fill it (the searches keep ~20-40 float32 copies
# of a chunk). On the CPU: 2^18 keeps the working set in cache; 2^16 where make_qx_quants evaluates
# its 19 candidate scales at once; 2^20 for Q3_K's per-element refinement, which is many small ops.
_CPU_CHUNK_LOG2 = {T.Q6_K: 16, T.Q3_K: 20}
_CPU_CHUNK_LOG2_IMATRIX = {T.Q4_0: 16, T.Q5_0: 16, T.Q3_K: 16, T.Q6_K: 16}


def _chunk_elements(qtype: T, device: torch.device, has_imatrix: bool) -> int:
    if device.type != "cpu":
        return 1 << 24
    table = _CPU_CHUNK_LOG2_IMATRIX if has_imatrix else _CPU_CHUNK_LOG2
    return 1 << table.get(qtype, 18)


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 1


@contextlib.contextmanager
def _one_intra_op_thread():
    """torch's CPU intra-op threads off while quantizing (restored after the last concurrent call).

    The quantizers are thousands of small element-wise ops; split over OpenMP threads each op waits
    at a barrier, and when other processes hold the cores that wait costs milliseconds (measured:
    100x slower on a busy 2-core machine), while on an idle one it gains nothing measurable."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def row_bytes(qtype: T, cols: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return cols // block * size


def _check(qtype, shape) -> T:
    try:
        qtype = T(qtype)
    except ValueError:
        raise ValueError(f"unknown GGML quantization type {qtype!r}") from None
    if qtype not in _QUANTIZERS:
        names = ", ".join(t.name for t in SUPPORTED)
        raise ValueError(f"GGUF quantization to {qtype.name} is not supported (supported: {names})")
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D [rows, cols] tensor, got shape {tuple(shape)}")
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[1] % block:
        raise ValueError(f"{qtype.name}: cols={shape[1]} is not a multiple of the block size {block}")
    return qtype


def quantize(w: torch.Tensor, qtype, imatrix: torch.Tensor | None = None, threads: int | None = None,
             compiled: bool = True, sigma2: torch.Tensor | None = None) -> torch.Tensor:
    """w [rows, cols] -> uint8 [rows, row_bytes(qtype, cols)], the bytes ggml_quantize_chunk writes.

    imatrix: float32 [cols] importance weights (llama.cpp's quant_weights) or None; ignored by the
    types whose ggml quantizer ignores it (F32, F16, BF16, Q8_0). On the CPU the block types run in
    the C quantizers (`native`) on `threads` threads (None: every core this process may use), on a
    CUDA GPU in the same C code built with nvcc; compiled=False or no compiler: the PyTorch ones (same
    bytes). sigma2 [rows]: the mean square of each whole row, for the 32-value types' importance weights
    when w is a slice of the rows (GGUF GPTQ quantizes one block column at a time); None: from w."""
    qtype = _check(qtype, w.shape)
    rows, cols = w.shape
    w = w.to(torch.float32)
    if imatrix is not None:
        imatrix = torch.as_tensor(imatrix).to(device=w.device, dtype=torch.float32).reshape(-1)
        if imatrix.numel() != cols:
            raise ValueError(f"imatrix has {imatrix.numel()} values, expected one per column ({cols})")
        if qtype in (T.F32, T.F16, T.BF16, T.Q8_0):
            imatrix = None
    out = torch.empty((rows, row_bytes(qtype, cols)), dtype=torch.uint8, device=w.device)
    if rows == 0 or cols == 0:
        return out
    if compiled and qtype in native.TYPES:
        if w.device.type == "cpu" and native.library() is not None:
            native.quantize(w.contiguous().numpy(), qtype, None if imatrix is None else imatrix.contiguous().numpy(),
                            out.numpy(), threads or native.default_threads(),
                            None if sigma2 is None else sigma2.float().contiguous().numpy())
            return out
        if w.device.type == "cuda" and native.cuda_library() is not None:
            native.quantize_cuda(w.contiguous(), qtype, None if imatrix is None else imatrix.contiguous(), out,
                                 None if sigma2 is None else sigma2.float())
            return out
    fn = _QUANTIZERS[qtype]
    legacy_sigma2 = sigma2 is not None and imatrix is not None and qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
    step = max(1, _chunk_elements(qtype, w.device, imatrix is not None) // max(cols, 1))
    with _one_intra_op_thread() if w.device.type == "cpu" else contextlib.nullcontext():
        for r0 in range(0, rows, step):
            extra = (sigma2[r0:r0 + step],) if legacy_sigma2 else ()
            out[r0:r0 + step] = fn(w[r0:r0 + step].contiguous(), imatrix, *extra)
    return out


def dequantize(data, qtype, shape) -> torch.Tensor:
    """GGUF tensor bytes -> float32 tensor of `shape`, on the bytes' device when they are a tensor
    (`dequant`; gguf-py's NumPy dequantizers for the types qconvert does not write)."""
    qtype = T(qtype)
    shape = tuple(int(s) for s in shape)
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if qtype in dequant.DEQUANTIZERS:
        raw = data if torch.is_tensor(data) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return dequant.DEQUANTIZERS[qtype](raw.reshape(rows, -1)).reshape(shape)
    if torch.is_tensor(data):
        data = data.detach().cpu().numpy()
    raw = np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray))
                               else np.asarray(data, dtype=np.uint8))
    values = gguf.quants.dequantize(raw.reshape(rows, -1), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
