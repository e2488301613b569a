"""llama.cpp importance matrices: what the k-quant search weighs each input column by.

An entry per weight matrix (GGUF tensor name): the sum over calibration tokens of each input
column's squared activation, and the token count, per expert for stacked MoE tensors. The value
the quantizer uses is sum / count (1 where an expert saw no token), as llama-quantize computes it.

Files (llama.cpp common/imatrix-loader.cpp, tools/imatrix):
- GGUF (current): KV general.type = "imatrix", imatrix.datasets [str], imatrix.chunk_count u32,
  imatrix.chunk_size u32; tensors `<name>.in_sum2` F32 [n_mat, ne0] and `<name>.counts` F32 [n_mat].
- legacy .dat: i32 n_entries, then per entry: i32 name length, name bytes, i32 ncall, i32 nval,
  nval f32 (already divided by the per-call count, times ncall); optionally i32 chunk count,
  i32 dataset-name length, dataset name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qconvert.errors import QConvertError


class SquaredSums:
    """Calibration statistic for one linear: per input column, the sum of x² over tokens."""

    def __init__(self, cols: int, device):
        self.sums = torch.zeros(cols, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.sums += x.float().pow(2).sum(0).double()
        self.tokens += x.shape[0]

    def reduce(self, ranks) -> None:
        ranks.sum_(self.sums)
        (tokens,) = ranks.add([self.tokens])
        self.tokens = int(tokens)

    def mean(self) -> torch.Tensor:
        """llama.cpp's importance: the mean x² per column, in float32 as llama-quantize divides the file's sums
        (Entry.values); 1 where no token came."""
        if not self.tokens:
            return torch.ones_like(self.sums, dtype=torch.float32)
        return self.sums.float() / torch.tensor(float(self.tokens), dtype=torch.float32, device=self.sums.device)


@dataclass
class Entry:
    sums: np.ndarray  # float32 [n_mat * ne0]
    counts: np.ndarray  # int64 [n_mat]

    def values(self) -> np.ndarray:
        """float32 sums / count per matrix, as llama-quantize's load_imatrix divides them."""
        n_mat = len(self.counts)
        sums = self.sums.astype(np.float32).reshape(n_mat, -1)
        counts = self.counts.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(counts > 0, sums / np.maximum(counts, np.float32(1)), np.float32(1))
        return out.astype(np.float32).reshape(-1)


@dataclass
class Imatrix:
    entries: dict[str, Entry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def values(self, name: str) -> np.ndarray | None:
        entry = self.entries.get(name)
        return None if entry is None else entry.values()


def write(path: Path, imatrix: Imatrix) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch="", use_temp_file=False)
    writer.kv_data[0].clear()  # no general.architecture: an imatrix file is not a model
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", imatrix.datasets or ["unknown"])
    writer.add_uint32("imatrix.chunk_count", imatrix.chunk_count)
    writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
    for name in sorted(imatrix.entries):
        entry = imatrix.entries[name]
        n_mat = len(entry.counts)
        writer.add_tensor(f"{name}.in_sum2", entry.sums.astype(np.float32).reshape(n_mat, -1))
        writer.add_tensor(f"{name}.counts", entry.counts.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read(path: Path) -> Imatrix:
    path = Path(path)
    if not path.is_file():
        raise QConvertError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    except QConvertError:
        raise
    except Exception as exc:
        raise QConvertError(f"{path}: not a llama.cpp imatrix file ({exc})") from None


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = reader.fields

    def scalar(key):
        return int(fields[key].parts[fields[key].data[0]][0]) if key in fields else 0

    datasets = []
    if "imatrix.datasets" in fields:
        f = fields["imatrix.datasets"]
        datasets = [bytes(f.parts[i]).decode() for i in f.data]
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    out = Imatrix(datasets=datasets, chunk_count=scalar("imatrix.chunk_count"), chunk_size=scalar("imatrix.chunk_size"))
    for name in tensors:
        if name.endswith(".in_sum2"):
            base = name.removesuffix(".in_sum2")
            if f"{base}.counts" not in tensors:
                raise QConvertError(f"{path}: {base} has sums but no counts")
            counts = np.rint(tensors[f"{base}.counts"]).astype(np.int64)  # lround, as llama.cpp reads them
            out.entries[base] = Entry(tensors[name], counts)
    if not out.entries:
        raise QConvertError(f"{path}: the imatrix holds no entries")
    return out


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise QConvertError(f"{path}: the imatrix holds no entries")
    out = Imatrix()
    for _ in range(n_entries):
        (length,) = take("<i")
        name = data[pos:pos + length].decode()
        pos += length
        ncall, nval = take("<ii")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).copy()
        pos += 4 * nval
        # legacy sums hold (sum / count) * ncall: dividing by ncall gives the value; store it
        # as sums with count ncall, which values() turns back into exactly sums / ncall
        # (a legacy ncall of 0 means the sums are the values: count 1 keeps them unchanged)
        out.entries[name] = Entry(sums, np.array([ncall if ncall > 0 else 1], dtype=np.int64))
    if pos + 4 <= len(data):
        (out.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if length > 0:
                out.datasets.append(data[pos:pos + length].decode())
    return out


def from_observations(sums: dict[str, list[tuple[torch.Tensor, int]]], datasets: list[str],
                      chunk_count: int, chunk_size: int) -> Imatrix:
    """GGUF name -> [(sums of x² [cols], tokens)] per matrix (one per expert) -> Imatrix."""
    out = Imatrix(datasets=datasets, chunk_count=chunk_count, chunk_size=chunk_size)
    for name, mats in sums.items():
        out.entries[name] = Entry(
            torch.cat([s.double().cpu() for s, _ in mats]).float().numpy(),
            np.array([n for _, n in mats], dtype=np.int64),
        )
    return out
