"""The block quantizers of native.c: compiled on first use, cached per source, flags and machine, called
through ctypes. On the CPU with the system C compiler, over row ranges in threads (ctypes releases the
GIL); on a CUDA GPU with nvcc (native_cuda.cu, the same C source), one GPU thread per block.

Without a compiler (or with QCONVERT_NATIVE=0) `library()` / `cuda_library()` is None and callers use
the PyTorch quantizers, which give the same bytes more slowly."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
CUDA_SOURCE = Path(__file__).with_name("native_cuda.cu")
# ggml's bytes need its float32 operation order: no fused multiply-add, no re-association. -march=native
# vectorises the independent per-element work (as llama.cpp's own build does); the cache key holds the CPU
FLAGS = ["-O3", "-march=native", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-lm"]
T = gguf.GGMLQuantizationType
TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K})
# elements per task at most: small enough to keep a task's rows in cache and the threads balanced
_TASK_ELEMENTS = 1 << 18

_lock = threading.Lock()
_built: dict[str, ctypes.CDLL | None] = {}  # "cpu" / "cuda": the library, or None where it cannot be had
_pool: ThreadPoolExecutor | None = None
# the same float32 rounding as the CPU build: no contraction into fused multiply-adds, IEEE div and sqrt
CUDA_FLAGS = ["-O3", "-shared", "-Xcompiler", "-fPIC", "-fmad=false", "-prec-div=true", "-prec-sqrt=true",
              "-ftz=false", "-arch=native"]


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cache_dir() -> Path:
    root = os.environ.get("QCONVERT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qconvert"
    return Path(root) / "native"


def _cpu() -> bytes:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor().encode()
    return next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "").encode()


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)[:1]


def _build(target: Path, commands: list[list[str]]) -> None:
    """Run the first command (its output file last) that succeeds, the others being fallbacks."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for i, command in enumerate(commands):
            try:
                subprocess.run([*command, tmp], check=True, capture_output=True, text=True)
                break
            except subprocess.CalledProcessError:
                if i == len(commands) - 1:
                    raise
        os.replace(tmp, target)  # atomic: a concurrent process loads either nothing or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path, commands: list[list[str]], what: str) -> ctypes.CDLL | None:
    try:
        if not path.exists():
            _build(path, commands)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip()
        log.warning("GGUF %s quantizers unavailable (%s); using the slower PyTorch ones", what,
                    detail.splitlines()[-1] if detail else type(e).__name__)
        return None


def _key(*parts: bytes) -> str:
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _once(name: str, build) -> ctypes.CDLL | None:
    """build() the first time (None when QCONVERT_NATIVE=0), the same library every later time."""
    with _lock:
        if name not in _built:
            _built[name] = None if os.environ.get("QCONVERT_NATIVE", "1") == "0" else build()
        return _built[name]


def library() -> ctypes.CDLL | None:
    """The compiled quantizers, or None (disabled, or no working compiler: a warning says why once)."""
    return _once("cpu", _build_cpu)


def _build_cpu() -> ctypes.CDLL | None:
    key = _key(SOURCE.read_bytes(), " ".join(FLAGS + _compiler()).encode(), platform.machine().encode(), _cpu())
    portable = [f for f in FLAGS if f != "-march=native"]  # for a compiler without -march=native
    lib = _load(_cache_dir() / f"gguf-quants-{key}.so",
                [[*_compiler(), *flags, str(SOURCE), "-o"] for flags in (FLAGS, portable)], "C")
    if lib is not None:
        fn = lib.qcv_quantize_rows
        fn.restype = ctypes.c_int64
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p]
        _gptq_signature(lib.qcv_gptq_superblocks)
    return lib


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    found = Path(home) / "bin" / "nvcc" if home else None
    return str(found) if found and found.exists() else shutil.which("nvcc")


def cuda_library() -> ctypes.CDLL | None:
    """native_cuda.cu built with nvcc for this GPU, or None (disabled, no nvcc: a warning says why once)."""
    return _once("cuda", _build_cuda)


def _build_cuda() -> ctypes.CDLL | None:
    import torch

    nvcc = _nvcc()
    if nvcc is None:
        log.warning("GGUF CUDA quantizers unavailable (no nvcc); using the slower PyTorch ones")
        return None
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = _key(SOURCE.read_bytes(), CUDA_SOURCE.read_bytes(), " ".join(CUDA_FLAGS).encode(), version.encode(),
               str(torch.cuda.get_device_capability()).encode())
    older = [f for f in CUDA_FLAGS if f != "-arch=native"]  # nvcc before 11.6: PTX for the driver to compile
    lib = _load(_cache_dir() / f"gguf-quants-cuda-{key}.so",
                [[nvcc, *flags, str(CUDA_SOURCE), "-o"] for flags in (CUDA_FLAGS, older)], "CUDA")
    if lib is not None:
        fn = lib.qcv_quantize_rows_cuda
        fn.restype = ctypes.c_int64
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        _gptq_signature(lib.qcv_gptq_superblocks_cuda, stream=True)
    return lib


def _gptq_signature(fn, stream: bool = False) -> None:
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + ([ctypes.c_void_p] if stream else [])


def _check_done(done: int, qtype: T, what: str) -> None:
    if done < 0:
        raise RuntimeError(f"{qtype.name}: the {what} failed ({'type not handled' if done == -1 else 'launch'})")


def quantize_cuda(x, qtype: T, imatrix, out, sigma2=None) -> None:
    """x float32 CUDA [rows, cols] (contiguous) -> out uint8 CUDA [rows, row bytes], on the current stream.
    sigma2: the rows' mean squares for the 32-value types' importance weights (None: from x)."""
    import torch

    rows, cols = x.shape
    given = sigma2 is not None
    sigma2 = sigma2.contiguous() if given else torch.empty(rows, dtype=torch.float32, device=x.device)
    stream = torch.cuda.current_stream(x.device)
    done = cuda_library().qcv_quantize_rows_cuda(
        int(qtype), x.data_ptr(), rows, cols, None if imatrix is None else imatrix.data_ptr(), sigma2.data_ptr(),
        int(given), out.data_ptr(), stream.cuda_stream)
    _check_done(done, qtype, "CUDA quantizer")
    stream.synchronize()  # sigma2 is freed on return


def gptq_superblocks(w, u, qtype: T, qw, out, scaled, threads: int | None = None) -> None:
    """GPTQ onto a k-quant grid for one super-block column (native.c, `Compensation`): w float32 [rows, 256]
    (rows contiguous, updated), u [256, 256] (rows contiguous), qw [256] or None -> out uint8 [rows, block
    bytes], scaled float32 [rows, 256] (contiguous). On w's device; CPU rows are split over threads."""
    import torch

    rows = w.shape[0]
    if u.stride(1) != 1:  # a factor from LAPACK is column-major: the C reads rows
        u = u.contiguous()
    assert w.stride(1) == 1 and out.is_contiguous() and scaled.is_contiguous()
    args = lambda r0, r1: (int(qtype), w[r0:r1].data_ptr(), r1 - r0, w.stride(0), u.data_ptr(), u.stride(0),
                           None if qw is None else qw.data_ptr(), out[r0:r1].data_ptr(), out.stride(0),
                           scaled[r0:r1].data_ptr())
    if w.is_cuda:
        stream = torch.cuda.current_stream(w.device)
        _check_done(cuda_library().qcv_gptq_superblocks_cuda(*args(0, rows), stream.cuda_stream), qtype, "CUDA GPTQ")
        return
    fn = library().qcv_gptq_superblocks
    for done in _over_rows(lambda r0, r1: fn(*args(r0, r1)), rows, w.shape[1], threads or default_threads()):
        _check_done(done, qtype, "GPTQ sweep")


def available(device) -> bool:
    """Whether the compiled quantizers run on this device (building them on first use)."""
    kind = getattr(device, "type", device)
    return (library() if kind == "cpu" else cuda_library() if kind == "cuda" else None) is not None


def _executor(threads: int) -> ThreadPoolExecutor:
    """One pool for the process (a conversion quantizes hundreds of tensors), grown when asked for more."""
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="gguf-quant")
        return _pool


def _over_rows(call, rows: int, cols: int, threads: int) -> list:
    """call(r0, r1) over row ranges (see _tasks), on the pool when there is more than one thread."""
    tasks = _tasks(rows, cols, threads)
    if threads <= 1 or len(tasks) == 1:
        return [call(*t) for t in tasks]
    return list(_executor(threads).map(lambda t: call(*t), tasks))


def _tasks(rows: int, cols: int, threads: int) -> list[tuple[int, int]]:
    """Row ranges of equal size, a multiple of `threads` of them (none idle at the end)."""
    per_round = threads * _TASK_ELEMENTS
    n = min(rows, threads * max(1, -(-rows * cols // per_round)))
    step = -(-rows // n)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def quantize(x: np.ndarray, qtype: T, imatrix: np.ndarray | None, out: np.ndarray, threads: int,
             sigma2: np.ndarray | None = None) -> None:
    """x float32 [rows, cols] (C order) -> out uint8 [rows, row bytes], rows split over `threads`.
    sigma2: the rows' mean squares for the 32-value types' importance weights (None: from x)."""
    fn = library().qcv_quantize_rows
    rows, cols = x.shape
    qw = None if imatrix is None else imatrix.ctypes.data

    def run(r0: int, r1: int) -> int:
        s2 = None if sigma2 is None else sigma2[r0:r1].ctypes.data
        return fn(int(qtype), x[r0:r1].ctypes.data, r1 - r0, cols, qw, s2, out[r0:r1].ctypes.data)

    for done in _over_rows(run, rows, cols, threads):
        _check_done(done, qtype, "C quantizer")
