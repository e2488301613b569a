"""Recipes, `qconvert run` and `qconvert batch`: validation, gates, JSON/JUnit reports, resume after a
kill, the shared imatrix and the hub upload."""

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from qconvert.batch.recipes import bundled, load
from qconvert.errors import QConvertError
from qconvert.testing.tiny_models import make_tiny_model

EVAL = {"samples": 2, "seq_len": 32}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny llama with a SentencePiece tokenizer (GGUF recipes need one llama.cpp knows)."""
    return make_tiny_model(tmp_path_factory.mktemp("batch") / "tiny", "llama", 2, tokenizer="sentencepiece")


def _write(path, text):
    path.write_text(text)
    return path


def _manifest(tmp_path, recipes, models=("tiny",), **extra):
    data = {"output_dir": "out", "models": list(models), "recipes": recipes, "eval": EVAL, **extra}
    return _write(tmp_path / "manifest.yaml", json.dumps(data))  # JSON is YAML


def test_bundled_recipes_are_valid(qconvert):
    names = {r.name for r in bundled()}
    assert {"w4a16-awq", "w4a16-gptq", "w4a16-gptq-actorder", "w4a16-marlin", "fp8-dynamic", "fp8-block",
            "w8a8-int8-smoothquant", "gguf-q4_k_m", "gguf-q4_k_m-imatrix", "gguf-q4_k_m-awq", "gguf-q4_k_m-awq-gptq",
            "gguf-q8_0"} <= names
    res = qconvert("recipes", "--json")
    assert res.code == 0 and {r["name"] for r in res.json()} == names


@pytest.mark.parametrize("text,fragment", [
    ("method: gptq\nparams: {bits: 4}\nformatt: gptq\n", "unknown key 'formatt' (allowed: name, description, method"),
    ("method: gptqq\n", "method 'gptqq' is not one of rtn, gptq, awq, fp8, int8, gguf"),
    ("method: gptq\nparams: {w_bit: 4}\n", "unknown key 'w_bit' (allowed: bits, group_size, symmetric"),
    ("method: gptq\nparams: {bits: four}\n", "params.bits: expected int, got 'four'"),
    ("method: gptq\nparams: {bits: 5}\n", "--w-bit 5 is not supported"),
    ("method: awq\nformat: gguf\n", "format 'gguf' is not one of awq, compressed-tensors, marlin"),
    ("method: gguf\nparams: {type: Q4_K_X}\n", "unknown GGUF type 'Q4_K_X'"),
    ("method: gguf\nparams: {type: Q4_K_M, method: smoothquant}\n",
     "params.method: 'smoothquant' is not one of plain, imatrix, gptq, awq"),
    ("method: rtn\ngates: {max_kl: -1}\n", "gates.max_kl: a number >= 0"),
    ("method: rtn\ngates: {max_ppl: 3}\n", "unknown key 'max_ppl' (allowed: max_ppl_increase_pct, max_kl)"),
])
def test_invalid_recipes_name_the_key(tmp_path, text, fragment):
    with pytest.raises(QConvertError, match=None) as err:
        load(_write(tmp_path / "r.yaml", text))
    assert fragment in str(err.value)


def test_run_gates_and_exit_code(model, qconvert, tmp_path):
    res = qconvert("run", "w4a16-rtn", model, "-o", tmp_path / "ok", "--eval-samples", "2", "--eval-seq-len", "32",
                   "--json", "-q")
    assert res.code == 0, res.err
    result = res.json()
    assert result["status"] == "ok" and result["verified"] and result["gates"][0]["passed"]
    assert (tmp_path / "ok" / "report.html").is_file()
    strict = _write(tmp_path / "strict.yaml", "name: strict\nmethod: rtn\ngates: {max_kl: 0.0000001}\n")
    res = qconvert("run", strict, model, "-o", tmp_path / "strict", "--eval-samples", "2", "--eval-seq-len", "32",
                   "--json", "-q")
    assert res.code == 1 and res.json()["status"] == "gate-failed"


def test_batch_reports_failures_and_gates(model, qconvert, tmp_path):
    _write(tmp_path / "strict.yaml", "name: strict\nmethod: rtn\ngates: {max_kl: 0.0000001}\n")
    (tmp_path / "tiny").symlink_to(model)
    manifest = _manifest(tmp_path, ["w4a16-rtn", "gguf-q8_0", "./strict.yaml"], models=["tiny", "./missing"])
    res = qconvert("batch", manifest, "--jobs", "2", "--report-json", tmp_path / "r.json", "--junit",
                   tmp_path / "j.xml", "-q")
    assert res.code == 1
    jobs = {j["id"]: j for j in json.loads((tmp_path / "r.json").read_text())["jobs"]}
    assert jobs["tiny/w4a16-rtn"]["status"] == "ok" and jobs["tiny/gguf-q8_0"]["status"] == "ok"
    assert jobs["tiny/strict"]["status"] == "gate-failed"
    assert all(jobs[f"missing/{r}"]["status"] == "failed" and "no such directory" in jobs[f"missing/{r}"]["error"]
               for r in ("w4a16-rtn", "gguf-q8_0", "strict"))
    assert (tmp_path / "out" / "tiny" / "gguf-q8_0.gguf").is_file()
    suite = ET.parse(tmp_path / "j.xml").getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("6", "1", "3")
    index = (tmp_path / "out" / "index.html").read_text()
    assert "tiny/w4a16-rtn/report.html" in index and "gguf-q8_0.gguf.report.html" in index
    assert not list((tmp_path / "out").rglob("*.partial"))


def test_resume_after_kill(model, qconvert, tmp_path):
    (tmp_path / "tiny").symlink_to(model)
    manifest = _manifest(tmp_path, ["w4a16-rtn", "fp8-dynamic", "gguf-q8_0"])
    state = tmp_path / "out" / ".qconvert-batch"
    proc = subprocess.Popen([sys.executable, "-m", "qconvert", "batch", str(manifest), "-q"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (state / "tiny--w4a16-rtn.json").is_file():  # the first job is done: kill the batch mid-way
        assert proc.poll() is None and time.time() < deadline, "the batch ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = tmp_path / "out" / "tiny" / "w4a16-rtn" / "model.safetensors"
    stamp = first.stat().st_mtime_ns
    res = qconvert("batch", manifest, "--resume", "--report-json", tmp_path / "r.json", "-q")
    assert res.code == 0, res.err
    jobs = {j["id"]: j for j in json.loads((tmp_path / "r.json").read_text())["jobs"]}
    assert jobs["tiny/w4a16-rtn"].get("resumed") and first.stat().st_mtime_ns == stamp  # not redone
    assert all(j["status"] == "ok" and j["verified"] for j in jobs.values())
    assert not jobs["tiny/gguf-q8_0"].get("resumed")
    assert not list((tmp_path / "out").rglob("*.partial"))  # the killed job's staging folder is gone


def test_imatrix_is_computed_once_per_model(model, qconvert, tmp_path, record_property, capsys):
    """Two imatrix GGUF recipes of one model share one calibration pass; timed against running each alone."""
    (tmp_path / "tiny").symlink_to(model)
    for t in ("Q4_K_M", "Q5_K_M"):
        _write(tmp_path / f"{t}.yaml", f"name: {t.lower()}\nmethod: gguf\nparams: {{type: {t}, imatrix: true}}\n"
                                       "calibration: {dataset: mixed, samples: 32, seq_len: 256}\n")
    manifest = _manifest(tmp_path, ["./Q4_K_M.yaml", "./Q5_K_M.yaml"])
    res = qconvert("batch", manifest, "--report-json", tmp_path / "r.json", "-q")
    assert res.code == 0, res.err
    jobs = json.loads((tmp_path / "r.json").read_text())["jobs"]
    assert [j["imatrix_shared"] for j in jobs] == ["computed", "reused"]
    assert len(list((tmp_path / "out" / ".qconvert-batch" / "imatrix").glob("*.imatrix.gguf"))) == 1
    # the same two recipes in this process, with and without the shared imatrix (timed, not asserted)
    seconds = {}
    for mode, cache in (("shared", ["--imatrix-cache", tmp_path / "cache"]), ("separate", [])):
        start = time.perf_counter()
        for t in ("Q4_K_M", "Q5_K_M"):
            assert qconvert("run", tmp_path / f"{t}.yaml", model, "-o", tmp_path / f"{mode}-{t}.gguf", "--no-eval",
                            *cache, "-q").code == 0
        seconds[mode] = time.perf_counter() - start
        record_property(f"imatrix_{mode}_seconds", round(seconds[mode], 2))
    with capsys.disabled():
        print(f"\ntwo imatrix GGUF recipes: {seconds['shared']:.1f} s sharing one imatrix, "
              f"{seconds['separate']:.1f} s each computing its own")


def test_push_to_hub_uploads_verified_outputs(model, qconvert, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok=False):
            calls.append(("create", repo_id))

        def upload_folder(self, repo_id, folder_path):
            calls.append(("folder", repo_id, folder_path))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    (tmp_path / "tiny").symlink_to(model)
    manifest = _manifest(tmp_path, ["w4a16-rtn"], push_to_hub="org/{model}-{recipe}")
    res = qconvert("batch", manifest, "--report-json", tmp_path / "r.json", "-q")
    assert res.code == 0, res.err
    out = tmp_path / "out" / "tiny" / "w4a16-rtn"
    assert calls == [("create", "org/tiny-w4a16-rtn"), ("folder", "org/tiny-w4a16-rtn", str(out))]
    assert (out / "README.md").is_file()  # the model card goes up with it
    calls.clear()
    res = qconvert("run", "w4a16-rtn", model, "-o", tmp_path / "one", "--no-eval", "--push-to-hub", "org/one", "-q")
    assert res.code == 0 and calls == [("create", "org/one"), ("folder", "org/one", str(tmp_path / "one"))]
