"""Lazy, shard-by-shard reading of a Hugging Face checkpoint directory.

Nothing is loaded at open time but the JSON config and the safetensors headers; tensors are read on
request, file by file, and the file handles are closed again so that the mapped pages of tensors
already used do not stay resident.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from qconvert.errors import QConvertError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a conversion needs from a hub repository (weights in safetensors or .bin, config, tokenizer)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_model(spec: str) -> Path:
    """A local directory as is; otherwise a hub id fetched with huggingface_hub."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QConvertError(f"{spec}: is a file, not a checkpoint directory")
        return path
    if not _REPO_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise QConvertError(f"{spec}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # network, auth, missing repo: all one message for the user
        raise QConvertError(
            f"{spec}: no such directory, and the Hugging Face hub could not provide it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


class Checkpoint:
    """A checkpoint directory: config.json plus safetensors (or .bin) weights, one or many shards."""

    def __init__(self, path: Path):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise QConvertError(f"{self.path}: not a checkpoint (no config.json)")
        try:
            self.config_dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise QConvertError(f"{config_file}: invalid JSON ({exc})") from None
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self._bin = False
        self._headers: dict[Path, tuple[dict, int]] = {}  # safetensors file -> (header, data start), once read
        self._index_files()

    # -- discovery -------------------------------------------------------------------------
    def _index_files(self) -> None:
        files = self._weight_files()
        for file in files:
            if self._bin:
                state = self._torch_load(file)
                for name, t in state.items():
                    self._file_of[name] = file
                    self._meta[name] = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
                continue
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        self._file_of[name] = file
                        self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())
            except SafetensorError as exc:
                raise QConvertError(f"{file}: corrupt or truncated safetensors file ({exc})") from None
        if not self._file_of:
            raise QConvertError(f"{self.path}: the weight files hold no tensors")

    def _weight_files(self) -> list[Path]:
        for index_name, single, is_bin in (
            (SAFETENSORS_INDEX, "model.safetensors", False),
            (BIN_INDEX, "pytorch_model.bin", True),
        ):
            index = self.path / index_name
            if index.is_file():
                self._bin = is_bin
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as exc:
                    raise QConvertError(f"{index}: invalid index ({exc})") from None
                files = sorted({self.path / f for f in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise QConvertError(f"{self.path}: shard(s) listed in {index_name} are missing: {', '.join(missing)}")
                return files
            if (self.path / single).is_file():
                self._bin = is_bin
                return [self.path / single]
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            return shards
        raise QConvertError(f"{self.path}: not a checkpoint (no .safetensors or pytorch_model.bin weights)")

    @staticmethod
    def _torch_load(file: Path) -> dict[str, torch.Tensor]:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise QConvertError(f"{file}: cannot read as a PyTorch weights file ({exc})") from None

    # -- queries ---------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return self.config_dict.get("model_type", "")

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> str:
        """Storage dtype as safetensors names it (BF16, F16, F32, ...) or torch's name for .bin."""
        return self._meta[name][1]

    def torch_dtype(self, name: str) -> torch.dtype:
        from qconvert.formats.shards import TORCH_DTYPES

        stored = self.dtype(name)
        return TORCH_DTYPES.get(stored) or getattr(torch, stored)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self._file_of.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    # -- reading ---------------------------------------------------------------------------
    def load(self, names: list[str], check: bool = True, pin: bool = False) -> dict[str, torch.Tensor]:
        """Read tensors (in their stored dtype), opening each file once; NaN/Inf are refused unless
        `check` is off (the caller then checks them with check_finite, e.g. on the GPU). `pin`: into
        page-locked memory, which a GPU copies from three to four times faster."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            if name not in self._file_of:
                raise QConvertError(f"{self.path}: tensor {name} is missing")
            by_file[self._file_of[name]].append(name)
        out = {}
        for file, file_names in by_file.items():
            if self._bin:
                state = self._torch_load(file)
                out.update({n: state[n].pin_memory() if pin else state[n].clone() for n in file_names})
                continue
            out.update(self._read(file, file_names, pin))
        if check:
            for n, t in out.items():
                self.check_finite(n, t)
        return out

    def _read(self, file: Path, names: list[str], pin: bool = False) -> dict[str, torch.Tensor]:
        """Tensors of one safetensors file, read into fresh memory (page-locked with `pin`: read there
        directly, not copied there after). Not through a memory map: the mapped pages a read touches count in
        the process's resident memory until it ends, which doubled the peak of a conversion larger than RAM."""
        header, start = self._header(file)
        out = {}
        with open(file, "rb", buffering=0) as f:
            for n in names:
                begin, end = header[n]["data_offsets"]
                t = torch.empty(self.shape(n), dtype=self.torch_dtype(n), pin_memory=pin)
                buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                f.seek(start + begin)
                if end - begin != len(buf) or _read_into(f, buf) != len(buf):
                    raise QConvertError(f"{file}: corrupt safetensors file (tensor {n} does not fit its data)")
                out[n] = t
        return out

    def _header(self, file: Path) -> tuple[dict, int]:
        """The file's header, parsed once (every block read and every tensor the GGUF writer reads need it)."""
        if file not in self._headers:
            self._headers[file] = safetensors_header(file)
        return self._headers[file]

    def load_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """tensor[rows] of a 2-D tensor, not checked for NaN/Inf. From safetensors only those rows' pages
        are read, through a memory map (calibration needs a few thousand rows of a 128k-row embedding)."""
        if self._bin:
            return self.load([name], check=False)[name][rows]
        file = self._file_of[name]
        header, data_start = self._header(file)
        begin, end = header[name]["data_offsets"]
        n_rows = self.shape(name)[0]
        table = np.memmap(file, dtype=np.uint8, mode="r", offset=data_start + begin,
                          shape=(n_rows, (end - begin) // n_rows))
        picked = torch.from_numpy(np.ascontiguousarray(table[rows.numpy()]))
        return picked.view(self.torch_dtype(name)).reshape(len(rows), *self.shape(name)[1:])

    def check_finite(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.is_floating_point() and not bool(finite_flag(tensor)):
            raise self.not_finite(name)

    def not_finite(self, name: str) -> QConvertError:
        return QConvertError(f"{name} in {self._file_of[name].name} holds NaN or Inf values")

    def get(self, name: str) -> torch.Tensor:
        return self.load([name])[name]


def safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the file offset its data starts at (the file is a u64 header
    length, the header, then the data; data_offsets count from that start)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _read_into(f, buf: memoryview) -> int:
    """Fill buf from f; one read returns at most about 2 GiB on Linux."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def finite_flag(tensor: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """A 0-d bool tensor on tensor's device, true when it holds no NaN or Inf (not waited for). Through each
    slice's minimum and maximum, which carry any NaN or Inf: a reduction, 20x faster on the host than an
    isfinite mask. float8 is widened slice by slice (fp16 holds it exactly; it has no kernels)."""
    flat = tensor.reshape(-1)
    if not flat.numel():
        return torch.ones((), dtype=torch.bool, device=flat.device)
    widen = (lambda part: part.to(torch.float16)) if flat.element_size() == 1 else (lambda part: part)  # noqa: E731
    ends = [torch.stack(torch.aminmax(widen(part))) for part in flat.split(chunk)]
    return torch.isfinite(torch.stack(ends)).all()
