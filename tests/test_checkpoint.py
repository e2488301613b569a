"""Checkpoints are read lazily from local folders (safetensors shards or .bin) or the hub."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from qconvert.errors import QConvertError
from qconvert.model.checkpoint import Checkpoint, finite_flag, resolve_model


def test_local_path_never_touches_the_hub(tiny, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the hub was asked for a local checkpoint")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_network)
    assert resolve_model(str(tiny())) == tiny()


def test_hub_id_resolves_through_huggingface_hub(tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append(repo_id)
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    assert resolve_model("some-org/some-model") == tmp_path and calls == ["some-org/some-model"]


def test_unreachable_hub_gives_one_clear_error(qconvert, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    res = qconvert("rtn", "no-such-org/no-such-model", "-o", tmp_path / "out")
    assert res.code == 2 and "the Hugging Face hub could not provide it" in res.err


def test_sharded_and_bin_checkpoints(tiny, qconvert, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny(layers=3), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    for name in ("sharded", "bin"):
        for f in tiny().glob("tokenizer*"):
            (tmp_path / name / f.name).write_bytes(f.read_bytes())
    sharded, binary = Checkpoint(tmp_path / "sharded"), Checkpoint(tmp_path / "bin")
    assert len({sharded._file_of[n] for n in sharded.names()}) > 1
    assert set(sharded.names()) == set(binary.names())
    name = "model.layers.2.mlp.down_proj.weight"
    assert torch.equal(sharded.get(name), binary.get(name))
    rows = torch.tensor([7, 0, 3, 7])  # calibration reads only the embedding rows its tokens use
    for ckpt in (sharded, binary):
        assert torch.equal(ckpt.load_rows(name, rows), ckpt.get(name)[rows])
    outs = [tmp_path / f"out-{n}" for n in ("sharded", "bin")]
    for src, out in zip(("sharded", "bin"), outs):
        assert qconvert("rtn", tmp_path / src, "-o", out, "-q").code == 0
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()


def test_missing_shard_is_named(tiny, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny(layers=3), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    victim = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(QConvertError, match=victim.name):
        Checkpoint(tmp_path / "m")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e5m2],
                         ids=str)
def test_the_finiteness_check_finds_one_bad_value_in_any_slice(dtype):
    clean = torch.randn(1000).to(dtype)
    assert bool(finite_flag(clean, chunk=64))
    for at in (0, 63, 64, 500, 999):
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = clean.clone()
            t[at] = bad
            assert not bool(finite_flag(t, chunk=64)), (at, bad)
