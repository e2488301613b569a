"""Our streaming safetensors writer produces files the safetensors library reads back exactly."""

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qconvert.formats.shards import ShardWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(5, generator=g),
        "c.i32": torch.randint(-2**31, 2**31 - 1, (4, 9), dtype=torch.int32, generator=g),
        "d.i64": torch.tensor([3, 1024]),
        "e.u8": torch.randint(0, 255, (17,), dtype=torch.uint8, generator=g),
        "f.scalar": torch.tensor(2.5, dtype=torch.float16),
        "g.transposed": torch.randn(6, 4, generator=g).T,  # not contiguous
        "h.fp8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
    }


def test_single_file(tmp_path):
    writer = ShardWriter(tmp_path)
    for name, t in _tensors().items():
        writer.add(name, t)
    assert writer.finish() == ["model.safetensors"]
    back = load_file(tmp_path / "model.safetensors")
    for name, t in _tensors().items():
        assert back[name].dtype == t.dtype and torch.equal(back[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_shards_and_index(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=300)
    for name, t in _tensors().items():
        writer.add(name, t)
    files = writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors().values())
    for name, t in _tensors().items():
        got = load_file(tmp_path / index["weight_map"][name])[name]
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_header_larger_than_its_reserved_room(tmp_path):
    """Past HEADER_ROOM the shard is rewritten behind a header of the right size."""
    from qconvert.formats.shards import HEADER_ROOM

    tensors = {f"model.layers.{i}.a_rather_long_module_name.weight": torch.full((3,), i, dtype=torch.int32)
               for i in range(HEADER_ROOM // 60)}
    writer = ShardWriter(tmp_path)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.finish()
    path = tmp_path / "model.safetensors"
    assert int.from_bytes(path.read_bytes()[:8], "little") > HEADER_ROOM
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items())


def test_adds_from_several_threads(tmp_path):
    """The engine writes the embeddings from a second thread while the blocks are written."""
    from concurrent.futures import ThreadPoolExecutor

    writer = ShardWriter(tmp_path, max_shard_bytes=5000)
    parts = [{f"t{k}.{i}": torch.full((100 + i,), k * 1000 + i, dtype=torch.int32) for i in range(40)} for k in range(3)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda part: [writer.add(n, t) for n, t in part.items()], parts))
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    for part in parts:
        for name, t in part.items():
            assert torch.equal(load_file(tmp_path / index["weight_map"][name])[name], t)


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_reserved_tensors_keep_their_place_whenever_their_data_comes(tmp_path):
    """Tensors reserved from their headers come first in the files, however late (and from whichever thread)
    their bytes arrive, even across a shard boundary: two such runs give the same bytes."""
    from concurrent.futures import ThreadPoolExecutor

    early = {f"outside.{i}": torch.full((300,), i, dtype=torch.int32) for i in range(4)}
    blocks = {f"block.{i}": torch.full((200 + i,), -i, dtype=torch.int32) for i in range(6)}

    def run(folder, late: bool):
        folder.mkdir()
        writer = ShardWriter(folder, max_shard_bytes=3000)
        for name, t in early.items():
            writer.reserve(name, t.dtype, t.shape)
        with ThreadPoolExecutor(1) as pool:
            job = None if late else pool.submit(lambda: [writer.add(n, t) for n, t in early.items()])
            for name, t in blocks.items():
                writer.add(name, t)
            job = job or pool.submit(lambda: [writer.add(n, t) for n, t in reversed(early.items())])
            job.result()
        writer.finish()
        return folder

    first, second = run(tmp_path / "a", late=False), run(tmp_path / "b", late=True)
    assert _files(first) == _files(second)
    index = json.loads((first / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for name, t in {**early, **blocks}.items():
        assert torch.equal(load_file(first / index["weight_map"][name])[name], t)


def test_a_reserved_tensor_must_come_as_reserved(tmp_path):
    import pytest

    writer = ShardWriter(tmp_path)
    writer.reserve("x", torch.bfloat16, (4, 2))
    with pytest.raises(ValueError, match="reserved as BF16"):
        writer.add("x", torch.zeros(4, 2))
    writer.reserve("y", torch.int32, (3,))
    with pytest.raises(ValueError, match="never written: x, y"):
        writer.finish()
