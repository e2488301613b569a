"""Importance matrices: our GGUF and legacy files read back to the values llama-quantize would use."""

import struct

import numpy as np
import pytest

from qconvert.errors import QConvertError
from qconvert.formats.gguf import imatrix


def _sample() -> imatrix.Imatrix:
    rng = np.random.default_rng(0)
    return imatrix.Imatrix(
        entries={
            "blk.0.attn_q.weight": imatrix.Entry(rng.random(64, dtype=np.float32) * 100, np.array([640])),
            "blk.0.ffn_up_exps.weight": imatrix.Entry(rng.random(3 * 32, dtype=np.float32), np.array([5, 0, 7])),
        },
        datasets=["mixed"], chunk_count=10, chunk_size=64,
    )


def test_gguf_roundtrip(tmp_path):
    path = tmp_path / "imatrix.gguf"
    imatrix.write(path, _sample())
    back = imatrix.read(path)
    assert back.datasets == ["mixed"] and (back.chunk_count, back.chunk_size) == (10, 64)
    for name, entry in _sample().entries.items():
        assert np.array_equal(back.entries[name].sums, entry.sums)
        assert np.array_equal(back.entries[name].counts, entry.counts)
        assert np.array_equal(back.values(name), entry.values())


def test_values_divide_per_expert_and_default_to_one():
    entry = _sample().entries["blk.0.ffn_up_exps.weight"]
    values = entry.values().reshape(3, 32)
    assert np.array_equal(values[0], entry.sums[:32] / np.float32(5))
    assert (values[1] == 1).all()  # an expert with no token
    assert values.dtype == np.float32


def test_legacy_file(tmp_path):
    path = tmp_path / "imatrix.dat"
    sums = np.arange(1, 9, dtype=np.float32)
    name = b"blk.3.ffn_down.weight"
    data = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 4, 8) + sums.tobytes()
    data += struct.pack("<i", 12) + struct.pack("<i", 5) + b"wiki2"
    path.write_bytes(data)
    back = imatrix.read(path)
    assert np.array_equal(back.values("blk.3.ffn_down.weight"), sums / np.float32(4))
    assert back.chunk_count == 12 and back.datasets == ["wiki2"]


def test_not_an_imatrix(tmp_path):
    (tmp_path / "x.dat").write_bytes(b"\x00\x00\x00\x00")
    with pytest.raises(QConvertError, match="no entries"):
        imatrix.read(tmp_path / "x.dat")
    with pytest.raises(QConvertError, match="no such imatrix"):
        imatrix.read(tmp_path / "missing.dat")
