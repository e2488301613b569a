"""llama.cpp as a test oracle: its quantizers (ctypes on libggml-base), its HF->GGUF converter, its
llama-quantize / llama-imatrix / llama-perplexity tools and its inference (llama-cpp-python bindings).

Build it first with `bash scripts/build_llama_cpp.sh`, which writes `$CACHE/env.sh`
(CACHE = $QCONVERT_LLAMA_CPP, default ~/.cache/qconvert/llama.cpp-0.3.36). `locate()` reads the
environment variables LLAMA_CPP_DIR / LLAMA_CPP_BIN / LLAMA_CPP_LIB (or LLAMA_CPP_LIB_PATH) when set,
otherwise that env.sh.

No qconvert logic lives here: everything is llama.cpp's own code.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VERSION = "0.3.36"
BUILD_HINT = "run `bash scripts/build_llama_cpp.sh` (then `. <cache>/env.sh`)"


class OracleUnavailable(RuntimeError):
    """llama.cpp has not been built (or the env points at something that is not there)."""


def cache_dir() -> Path:
    return Path(os.environ.get("QCONVERT_LLAMA_CPP") or Path.home() / ".cache/qconvert" / f"llama.cpp-{VERSION}")


def _read_env_sh(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        m = re.match(r'\s*export\s+(\w+)="?([^"]*)"?\s*$', line)
        if m:
            env[m.group(1)] = m.group(2)
    return env


def locate() -> "Oracle":
    """The built llama.cpp, from the environment or the cache's env.sh; OracleUnavailable if absent."""
    env = dict(os.environ)
    if not env.get("LLAMA_CPP_DIR"):
        env_sh = cache_dir() / "env.sh"
        if not env_sh.is_file():
            raise OracleUnavailable(f"llama.cpp oracle not found (no LLAMA_CPP_DIR, no {env_sh}): {BUILD_HINT}")
        env = {**env, **_read_env_sh(env_sh)}
    try:
        src, bin_ = Path(env["LLAMA_CPP_DIR"]), Path(env["LLAMA_CPP_BIN"])
        lib = Path(env.get("LLAMA_CPP_LIB") or env["LLAMA_CPP_LIB_PATH"])
    except KeyError as e:
        raise OracleUnavailable(f"llama.cpp oracle: {e.args[0]} not set: {BUILD_HINT}") from None
    for p in (src / "convert_hf_to_gguf.py", bin_ / "llama-quantize", bin_ / "llama-perplexity",
              bin_ / "llama-imatrix", lib / "libggml-base.so", lib / "libllama.so", lib / "libllama-common.so",
              lib / "libllama-perplexity-impl.so"):
        if not p.exists():
            raise OracleUnavailable(f"llama.cpp oracle: {p} is missing: {BUILD_HINT}")
    return Oracle(src, bin_, lib)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]).strip()
        raise RuntimeError(f"{Path(str(cmd[0])).name} exited with {proc.returncode}: {' '.join(map(str, cmd))}\n{tail}")
    return proc


_FLUSHED_MAIN = """
import ctypes, sys
lib, impl, entry, *argv = sys.argv[1:]
common = ctypes.CDLL(lib + "/libllama-common.so")
main = getattr(ctypes.CDLL(lib + "/" + impl), entry)
rc = main(len(argv), (ctypes.c_char_p * len(argv))(*[a.encode() for a in argv]))
common._Z15common_log_mainv.restype = ctypes.c_void_p  # common_log * common_log_main()
common._Z16common_log_pauseP10common_log(ctypes.c_void_p(common._Z15common_log_mainv()))  # drain + join
sys.exit(rc)
"""


@dataclass
class Oracle:
    src: Path  # llama.cpp source tree: convert_hf_to_gguf.py, conversion/, gguf-py/
    bin: Path  # llama-quantize, llama-perplexity, llama-imatrix
    lib: Path  # libllama.so, libggml.so, libggml-base.so, libggml-cpu.so
    _ggml: ctypes.CDLL | None = field(default=None, repr=False)
    _models: dict = field(default_factory=dict, repr=False)

    # ---- ggml quantizers (ggml-base: ggml_quantize_chunk -> ggml-quants.c) ----
    @property
    def ggml(self) -> ctypes.CDLL:
        if self._ggml is None:
            g = ctypes.CDLL(str(self.lib / "libggml-base.so"))
            g.ggml_quantize_chunk.restype = ctypes.c_size_t
            g.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                              ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            g.ggml_row_size.restype = ctypes.c_size_t
            g.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
            g.ggml_blck_size.restype = ctypes.c_int64
            g.ggml_blck_size.argtypes = [ctypes.c_int]
            g.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
            g.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
            self._ggml = g
        return self._ggml

    def row_size(self, qtype: int, cols: int) -> int:
        return self.ggml.ggml_row_size(qtype, cols)

    def quantize_rows(self, qtype: int, data: np.ndarray, imatrix: np.ndarray | None = None) -> bytes:
        """ggml_quantize_chunk(qtype) of a float32 [rows, cols] matrix -> the GGUF tensor bytes.

        imatrix: float32 [cols] importance weights (llama-quantize passes one per column), or None.
        Checks ggml's asserts here so a bad call raises instead of aborting the process."""
        data = np.ascontiguousarray(data, dtype=np.float32)
        if data.ndim != 2:
            raise ValueError(f"data must be [rows, cols], got shape {data.shape}")
        rows, cols = data.shape
        blck = self.ggml.ggml_blck_size(qtype)
        if blck <= 0 or cols % blck:
            raise ValueError(f"ggml type {qtype}: cols={cols} is not a multiple of its block size {blck}")
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            if imatrix.shape != (cols,):
                raise ValueError(f"imatrix must have shape ({cols},), got {imatrix.shape}")
        elif self.ggml.ggml_quantize_requires_imatrix(qtype):
            raise ValueError(f"ggml type {qtype} requires an imatrix")
        size = rows * self.row_size(qtype, cols)
        out = ctypes.create_string_buffer(size)
        n = self.ggml.ggml_quantize_chunk(qtype, data.ctypes.data, out, 0, rows, cols,
                                          None if imatrix is None else imatrix.ctypes.data)
        assert n == size, (n, size)
        return out.raw

    # ---- tools ----
    def convert_hf(self, model_dir: str | Path, out_path: str | Path, outtype: str = "f32",
                   extra_args: tuple = ()) -> Path:
        """llama.cpp's convert_hf_to_gguf.py (with its own gguf-py, not the installed gguf)."""
        pythonpath = os.pathsep.join([str(self.src / "gguf-py"), str(self.src), os.environ.get("PYTHONPATH", "")])
        _run([sys.executable, self.src / "convert_hf_to_gguf.py", model_dir, "--outfile", out_path,
              "--outtype", outtype, *extra_args], env={**os.environ, "PYTHONPATH": pythonpath.rstrip(os.pathsep)},
             cwd=self.src)
        return Path(out_path)

    def quantize_file(self, inp: str | Path, out: str | Path, ftype: str, imatrix: str | Path | None = None,
                      extra_args: tuple = (), threads: int | None = None) -> float:
        """llama-quantize [--imatrix F] [extra_args] inp out ftype [threads]; returns its wall time in seconds."""
        cmd = [self.bin / "llama-quantize", *(["--imatrix", imatrix] if imatrix else []), *extra_args, inp, out, ftype,
               *([threads] if threads else [])]
        t = time.perf_counter()
        _run(cmd)
        return time.perf_counter() - t

    def imatrix(self, gguf_path: str | Path, text_file: str | Path, out: str | Path, ctx: int = 512,
                extra_args: tuple = ()) -> Path:
        """llama-imatrix over text_file -> an importance-matrix file (GGUF format) for quantize_file."""
        _run([self.bin / "llama-imatrix", "-m", gguf_path, "-f", text_file, "-c", ctx, "-o", out, *extra_args])
        return Path(out)

    def perplexity(self, gguf_path: str | Path, text_file: str | Path, ctx: int = 512, extra_args: tuple = ()) -> float:
        """llama-perplexity's final estimate over text_file (needs at least 2*ctx tokens of text)."""
        out = self._run_flushed("libllama-perplexity-impl.so", "_Z16llama_perplexityiPPc",  # llama_perplexity(int, char**)
                                ["-m", gguf_path, "-f", text_file, "-c", ctx, *extra_args])
        m = re.search(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf)", out)
        if not m:
            raise RuntimeError(f"llama-perplexity printed no final estimate:\n{out[-3000:]}")
        return float(m.group(1))

    def _run_flushed(self, impl: str, entry: str, args: list) -> str:
        """Run a llama.cpp tool's main (exported by its lib<tool>-impl.so) in a child Python, then drain the
        tool's log. The tools log through an asynchronous logger whose singleton is deliberately leaked
        (common/log.cpp, llama.cpp issue 22142), so the binaries often exit before printing their last
        lines -- llama-perplexity loses "Final estimate" more often than not when its output is a pipe."""
        proc = _run([sys.executable, "-c", _FLUSHED_MAIN, self.lib, impl, entry, impl.removeprefix("lib").split("-impl")[0], *args])
        return proc.stdout + proc.stderr

    # ---- inference through llama-cpp-python ----
    def _llama_cpp(self):
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(self.lib))  # read when llama_cpp is first imported
        try:
            import llama_cpp
        except ImportError as e:
            raise OracleUnavailable(f"llama-cpp-python bindings not importable ({e}): {BUILD_HINT}") from e
        return llama_cpp

    def _model(self, gguf_path: str | Path, vocab_only: bool, n_ctx: int = 0):
        """A loaded llama_cpp.Llama, reused while the file is unchanged and the context is big enough."""
        path = Path(gguf_path).resolve()
        st = path.stat()
        key, stamp = (str(path), vocab_only), (st.st_mtime_ns, st.st_size)
        old = self._models.get(key)
        if old is not None and old[0] == stamp and (vocab_only or old[1].n_ctx() >= n_ctx):
            return old[1]
        if old is not None:
            old[1].close()
        if not self._models:
            atexit.register(self.close)  # free models before interpreter teardown (else noisy __del__ errors)
        llm = self._llama_cpp().Llama(model_path=str(path), vocab_only=vocab_only, logits_all=not vocab_only,
                                      n_ctx=max(n_ctx, 512), n_batch=512, verbose=False)
        self._models[key] = (stamp, llm)
        return llm

    def tokenize(self, gguf_path: str | Path, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's tokenizer (vocab-only load); add_special adds BOS/EOS as the model's metadata says."""
        return self._model(gguf_path, vocab_only=True).tokenize(text.encode("utf-8"), add_bos=add_special, special=False)

    def logits(self, gguf_path: str | Path, tokens: list[int]) -> np.ndarray:
        """float32 [len(tokens), vocab]: the logits at every position of one sequence."""
        llm = self._model(gguf_path, vocab_only=False, n_ctx=len(tokens))
        llm.reset()
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)

    def close(self) -> None:
        for _, llm in self._models.values():
            llm.close()
        self._models.clear()
