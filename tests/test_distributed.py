"""Data-parallel calibration over torch.distributed, on the CPU with 2 gloo processes.

What the ranks combine is checked against one process on the same data: statistics (Hessians, imatrix sums,
maxima) to float32 rounding, since only the order of the additions changes; the work shared out by rows
(GPTQ's sweep, AWQ's clipping) exactly, since every row is computed the same way whichever rank holds it.
End to end, `--gpus 2 --device cpu` is compared with a single process: the reduction order changes the
Hessian in its last bits, and GPTQ's sweep turns a last-bit change near a rounding boundary into a flipped
code whose error then goes into the columns after it, and the next layer sees the changed outputs; so the
outputs agree in nearly every code of the first layer and in quality, not bit for bit.
"""

import json
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

from qconvert import distributed
from qconvert.algorithms import InputSet
from qconvert.algorithms.awq import AWQ, AWQConfig, _clip_rows, _Group, _TokenSample, clip_range
from qconvert.algorithms.fp8 import AbsMax
from qconvert.algorithms.gptq import GPTQ, GPTQConfig, Hessian, gptq
from qconvert.engine import _share_of
from qconvert.errors import QConvertError
from qconvert.formats.gguf import imatrix as imx
from qconvert.formats.gguf.imatrix import SquaredSums
from qconvert.quantized import QuantizedTensor
from qconvert.testing.ranks import run_ranks
from qconvert.testing.tiny_models import make_tiny_model

WORLD = 2


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 32, 64, generator=g), torch.randn(48, 64, generator=g) * 0.02  # 6 windows; a weight


def _statistics_rank(ranks):
    x, _ = _data()
    mine = ranks.samples(x)
    h, sq, mx = Hessian(64, "cpu"), SquaredSums(64, "cpu"), AbsMax("cpu")
    for window in mine:
        for stat in (h, sq, mx):
            stat.update(window[None])
    for stat in (h, sq, mx):
        stat.reduce(ranks)
    alone = Hessian(64, "cpu")
    alone.update(x)
    assert h.tokens == 6 * 32
    torch.testing.assert_close(h.matrix, alone.matrix, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sq.sums, x.reshape(-1, 64).double().pow(2).sum(0), rtol=1e-6, atol=0)
    assert float(mx.value) == float(x.abs().max())


def _share_rank(ranks):
    qt = QuantizedTensor(torch.full((3, 4), ranks.rank, dtype=torch.uint8), torch.ones(3, 1, dtype=torch.float16),
                         None, 4, -1, torch.arange(4, dtype=torch.int32))
    parts = ranks.gather({"qt": qt, "note": f"rank {ranks.rank}"})
    assert [p["note"] for p in parts] == ["rank 0", "rank 1"]
    stacked = QuantizedTensor.stack_rows([p["qt"] for p in parts])
    assert stacked.codes[:3].eq(0).all() and stacked.codes[3:].eq(1).all()
    assert stacked.g_idx.dtype == torch.int32 and torch.equal(stacked.g_idx, torch.arange(4, dtype=torch.int32))
    table = torch.arange(5, dtype=torch.float64) + ranks.rank  # one tensor in two places (the rotary tables)
    got = ranks.share({"a": table, "b": [table, torch.ones(3, dtype=torch.bool)]}, 1)
    assert got["a"] is got["b"][0] and torch.equal(got["a"], torch.arange(5, dtype=torch.float64) + 1)
    assert got["b"][1].dtype == torch.bool and got["b"][1].all()
    whole = ranks.stack_rows(torch.arange(3 * ranks.rank, 3 * ranks.rank + 3 - ranks.rank), 5)  # 3 + 2 rows
    assert torch.equal(whole, torch.arange(5))
    assert ranks.owners([5, 1, 4, 2]) == [0, 0, 1, 1]  # largest first, each to the lighter rank


def _rows_rank(ranks):
    x, w = _data()
    h = Hessian(64, "cpu")
    h.update(x)
    config = GPTQConfig(group_size=32, act_order=True, static_groups=False)
    lin = torch.nn.Linear(64, 48, bias=False)
    lin.weight.data = w.clone()
    mine = GPTQ(config, None).quantize(InputSet(0, "", ["l"], [lin]), h, torch.float16)[0]
    h2 = Hessian(64, "cpu")
    h2.update(x)
    alone = gptq(w, [h2.matrix], config, torch.float16)
    assert torch.equal(mine.codes, alone.codes) and torch.equal(mine.scale, alone.scale)
    assert torch.equal(mine.g_idx, alone.g_idx)
    cfg = AWQConfig(group_size=32)
    assert torch.equal(_clip_rows(w, x[0], cfg, ranks), clip_range(w, x[0], cfg))


def _sample_rank(ranks):
    x, _ = _data()
    mine, alone = _TokenSample(stride=4), _TokenSample(stride=4)
    for batch in ranks.samples(x).split(2):
        mine.update(batch)
    for batch in x.split(4):
        alone.update(batch)
    assert torch.equal(mine.take(20, ranks), alone.take(20))


def _search_rank(ranks):
    """AWQ's scale search, each rank trying its share of the candidates on every rank's windows, picks what
    one process picks from all the windows (the candidates differ in the last bits of the summed |x|)."""
    x, w = _data()
    x[..., :4] *= 8  # loud channels, so the scale matters
    lin = torch.nn.Linear(64, 48, bias=False)
    lin.weight.data = w.clone()

    def search(windows, r):
        g = _Group(None, [], "", ["l"], [lin], lin, [])
        for batch in windows.split(2):
            g.record((batch,), {}, limit=10**6)
        g.reduce(r)
        return AWQ(AWQConfig(group_size=32), SimpleNamespace(scale_groups=[None]))._search(g, r)

    mine, alone = search(ranks.samples(x), ranks), search(x, distributed.Ranks())
    torch.testing.assert_close(mine, alone, rtol=1e-5, atol=0)
    assert torch.equal(lin.weight.data, w)  # the weights are put back


def _checks(ranks):
    _statistics_rank(ranks)  # Hessians, imatrix sums, maxima
    _share_rank(ranks)  # results with tensors, from the rank that computed them
    _rows_rank(ranks)  # GPTQ's sweep and AWQ's clipping search, each rank taking its share of the rows
    _sample_rank(ranks)  # AWQ's clipping sample gathered in the single-process order
    _search_rank(ranks)  # AWQ's scale search, the candidates shared out


def test_what_ranks_combine_is_what_one_process_computes():
    run_ranks(WORLD, _checks)  # one spawn for all: starting the processes is most of the time


def _codes(out: Path) -> dict[str, torch.Tensor]:
    from qconvert.formats import gptq as gptq_format
    from qconvert.model.checkpoint import Checkpoint

    return {n: t.codes for n, t in gptq_format.read(Checkpoint(out)) if isinstance(t, QuantizedTensor)}


CAL = ["--device", "cpu", "--samples", "8", "--seq-len", "64", "-q"]


def test_two_processes_match_one(tiny, tmp_path, qconvert):
    model = tiny("llama", layers=2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert qconvert("gptq", str(model), "-o", str(one), *CAL).code == 0
    res = qconvert("gptq", str(model), "-o", str(two), *CAL, "--gpus", str(WORLD))
    assert res.code == 0, res.err
    r1, r2 = (json.loads((p / "report.json").read_text()) for p in (one, two))
    assert r2["processes"] == WORLD
    for l1, l2 in zip(r1["layers"], r2["layers"]):
        # every rank's tokens are counted, and the quantized block is as good
        assert [v["tokens"] for v in l1["linears"].values()] == [v["tokens"] for v in l2["linears"].values()]
        assert l2["output_error"] == pytest.approx(l1["output_error"], rel=0.15)
    c1, c2 = _codes(one), _codes(two)
    assert c1.keys() == c2.keys()
    for name in (n for n in c1 if ".layers.0." in n):
        same = float((c1[name] == c2[name]).float().mean())
        assert same > 0.97, f"{name}: {same:.3f} of the codes agree"


def test_the_imatrix_of_two_processes_is_the_imatrix_of_one(tmp_path, qconvert):
    model = make_tiny_model(tmp_path / "hf", "llama", 2, tokenizer="sentencepiece", hidden_size=256,
                            intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    files = []
    for gpus in ("1", str(WORLD)):
        out, imatrix = tmp_path / f"m{gpus}.gguf", tmp_path / f"m{gpus}.imatrix"
        res = qconvert("gguf", str(model), "Q4_K_M", "--method", "imatrix", "-o", str(out), "--save-imatrix",
                           str(imatrix), *CAL, "--gpus", gpus)
        assert res.code == 0, res.err
        files.append(imx.read(imatrix))
    one, two = files
    assert one.entries.keys() == two.entries.keys() and one.entries
    for name, entry in one.entries.items():
        assert (entry.counts == two.entries[name].counts).all()
        torch.testing.assert_close(torch.from_numpy(two.entries[name].sums), torch.from_numpy(entry.sums),
                                   rtol=1e-5, atol=0)


def test_more_processes_than_windows_is_refused():
    with pytest.raises(QConvertError, match="1 calibration window"):
        _share_of(torch.zeros(1, 8, dtype=torch.long), distributed.Ranks(0, WORLD))


def test_a_batch_job_converts_on_two_processes(tiny, tmp_path, qconvert):
    """`batch` hands `gpus` to each job's `qconvert run`, which spreads the conversion over the processes;
    rank 0 alone verifies, scores and reports (one JSON result on stdout)."""
    (tmp_path / "small.yaml").write_text("name: small\nmethod: gptq\nformat: gptq\n"
                                         "calibration: {dataset: mixed, samples: 8, seq_len: 64}\n")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(json.dumps({"output_dir": "out", "models": [{"path": str(tiny("llama", layers=2)),
                                    "name": "tiny"}], "recipes": ["./small.yaml"], "device": "cpu",
                                    "gpus": WORLD, "eval": {"samples": 2, "seq_len": 32}}))
    res = qconvert("batch", str(manifest), "--report-json", str(tmp_path / "r.json"), "-q")
    assert res.code == 0, res.err
    (job,) = json.loads((tmp_path / "r.json").read_text())["jobs"]
    assert job["status"] == "ok" and job["verified"], job
    assert json.loads((tmp_path / "out" / "tiny" / "small" / "report.json").read_text())["processes"] == WORLD


def test_jobs_running_at_once_get_gpus_of_their_own(tmp_path, monkeypatch):
    from qconvert.batch.manifest import Manifest
    from qconvert.batch.run import gpu_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    plan = Manifest(tmp_path / "m.yaml", tmp_path, [], {}, "cuda", gpus=2)
    assert gpu_slots(plan, 2) == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert gpu_slots(plan, 1) == [{}]
    with pytest.raises(QConvertError, match="4 GPU"):
        gpu_slots(plan, 3)
    assert gpu_slots(Manifest(tmp_path / "m.yaml", tmp_path, [], {}, "cuda"), 6) == [{}] * 6  # one GPU each: share
