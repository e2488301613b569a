"""Calibration data: every source kind reads, windows are seeded and start with BOS where the model uses one."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from qconvert.calibration.datasets import bundled_names, load_texts
from qconvert.calibration.tokens import bos_id, calibration_windows, evaluation_windows
from qconvert.errors import QConvertError


@pytest.fixture
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_bundled_sets_exist_and_are_disjoint():
    assert {"mixed", "heldout"} <= set(bundled_names())
    calibration, held_out = set(load_texts("mixed")), set(load_texts("heldout"))
    assert len(calibration) > 100 and len(held_out) > 50
    assert not calibration & held_out


def test_txt_jsonl_parquet_sources(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond one\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first paragraph", "second one"]
    rows = [{"text": "plain"}, {"messages": [{"role": "user", "content": "hi"}]}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    texts = load_texts(str(tmp_path / "b.jsonl"), tokenizer)
    assert texts[0] == "plain" and texts[1] == "<|user|>hi\n"  # rendered with the chat template
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x y", "z"]}), tmp_path / "c.parquet")
    assert load_texts(str(tmp_path / "c.parquet")) == ["x y", "z"]


def test_hf_spec_goes_through_datasets(tmp_path):
    """hf:NAME[:CONFIG][:SPLIT] is handed to datasets.load_dataset (here a local data folder)."""
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "from datasets"}) + "\n")
    assert load_texts(f"hf:{tmp_path}") == ["from datasets"]
    with pytest.raises(QConvertError, match="cannot load the dataset"):
        load_texts(f"hf:{tmp_path}::nosplit")


@pytest.mark.parametrize("content,message", [("{}", "needs a 'text'"), ('{"messages": []}', "chat template")])
def test_bad_rows_are_named(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content + "\n")
    with pytest.raises(QConvertError, match=message):
        load_texts(str(tmp_path / "bad.jsonl"))


def test_windows_are_seeded_and_start_with_bos(tokenizer):
    texts = load_texts("mixed")
    a = calibration_windows(texts, tokenizer, 8, 64, seed=1)
    b = calibration_windows(texts, tokenizer, 8, 64, seed=1)
    c = calibration_windows(texts, tokenizer, 8, 64, seed=2)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert bos_id(tokenizer) == 1 and (a[:, 0] == 1).all()
    e = evaluation_windows(load_texts("heldout"), tokenizer, 5, 64)
    assert e.shape == (5, 64) and (e[:, 0] == 1).all()
    assert torch.equal(e, evaluation_windows(load_texts("heldout"), tokenizer, 5, 64))


def test_too_little_text_is_refused(tmp_path, tokenizer):
    (tmp_path / "tiny.txt").write_text("just a few words")
    with pytest.raises(QConvertError, match="fewer than one window"):
        calibration_windows(load_texts(str(tmp_path / "tiny.txt")), tokenizer, 4, 512, 0)
