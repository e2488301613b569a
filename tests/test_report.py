"""report.json's per-linear and per-tensor facts, evaluations kept in it, and the HTML page opened in a
headless Chromium."""

import json
import re
import shutil
import subprocess

import gguf
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from qconvert.calibration.datasets import load_texts
from qconvert.calibration.tokens import calibration_windows
from qconvert.engine import SAMPLE_TOKENS
from qconvert.eval.loader import dequantized_state
from qconvert.model.checkpoint import Checkpoint
from qconvert.pipeline import load_tokenizer
from qconvert.testing.tiny_models import make_tiny_model

SMALL = ["--samples", "4", "--seq-len", "32", "-q"]


def test_linear_output_error_is_measured_on_its_calibration_inputs(tiny, qconvert, tmp_path):
    """RTN with calibration: layer 0's q_proj error on its inputs (the normed embeddings of the calibration
    tokens), recomputed here from the base model and the written weights."""
    model = tiny("llama")
    out = tmp_path / "out"
    assert qconvert("rtn", model, "-o", out, "--dataset", "mixed", *SMALL).code == 0
    q_proj = json.loads((out / "report.json").read_text())["layers"][0]["linears"]["self_attn.q_proj"]
    assert (q_proj["bits"], q_proj["group"]) == (4, "g128") and q_proj["seconds"] >= 0

    tokenizer = load_tokenizer(model)
    tokens = calibration_windows(load_texts("mixed", tokenizer), tokenizer, 4, 32, 0)
    assert tokens.numel() <= SAMPLE_TOKENS  # the sample is every calibration token
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).requires_grad_(False)
    layer = base.model.layers[0]
    x = layer.input_layernorm(base.model.embed_tokens(tokens)).reshape(-1, layer.self_attn.q_proj.in_features)
    w = layer.self_attn.q_proj.weight
    q = dequantized_state(Checkpoint(out))["model.layers.0.self_attn.q_proj.weight"].float()
    expected = float((x @ (w - q).T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert q_proj["output_error"] == pytest.approx(expected, rel=1e-3)


def test_gguf_report_matches_the_file(tmp_path, qconvert):
    model = make_tiny_model(tmp_path / "hf", "llama", 2, tokenizer="sentencepiece")
    out = tmp_path / "m.gguf"
    assert qconvert("gguf", model, "Q4_K_M", "-o", out, "-q").code == 0
    report = json.loads((tmp_path / "m.gguf.report.json").read_text())
    stored = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert set(report["tensors"]) == set(stored)
    for name, rec in report["tensors"].items():
        assert rec["type"] == stored[name].tensor_type.name and rec["bytes"] == int(stored[name].n_bytes)
        if rec["type"].startswith("Q"):
            assert 0 < rec["weight_error"] < 0.05
    assert len({rec["type"] for rec in report["tensors"].values()}) >= 3  # a mixture: F32 norms and two quant types


def test_eval_is_kept_and_reused(tiny, qconvert, tmp_path, monkeypatch):
    model = tiny("llama")
    out = tmp_path / "out"
    assert qconvert("rtn", model, "-o", out, "-q").code == 0
    res = qconvert("eval", out, "--base", model, "--samples", "2", "--seq-len", "32", "--json")
    assert res.code == 0
    kept = json.loads((out / "report.json").read_text())["evaluations"]
    assert len(kept) == 1 and kept[0]["kl_divergence"] == res.json()["kl_divergence"]

    def no_scoring(*args, **kwargs):
        raise AssertionError("a stored evaluation should have been reused")

    monkeypatch.setattr("qconvert.eval.run.score", no_scoring)
    res = qconvert("report", out, "--base", model, "--samples", "2", "--seq-len", "32")
    assert res.code == 0, res.err
    assert f"{kept[0]['perplexity']:.3f}" in (out / "report.html").read_text()


def test_report_refuses_what_is_not_an_output(tiny, qconvert):
    res = qconvert("report", tiny("llama"))
    assert res.code != 0 and "no report.json found" in res.err


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no Chromium: install Debian's `chromium` package (.ci/run does) to open the report")
    return found


def _browser(chromium: str, profile, *args) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--force-device-scale-factor=1", "--hide-scrollbars", "--window-size=1200,3400"]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)


def test_page_opens_in_chromium_with_its_charts(tiny, qconvert, tmp_path):
    chromium = _chromium()
    model = tiny("llama", layers=4)
    gptq, awq = tmp_path / "gptq", tmp_path / "awq"
    assert qconvert("gptq", model, "-o", gptq, "--format", "compressed-tensors", *SMALL).code == 0
    assert qconvert("awq", model, "-o", awq, "--format", "compressed-tensors", *SMALL).code == 0
    page = tmp_path / "page.html"
    res = qconvert("report", gptq, "--compare", awq, "--base", model, "--html", page, "--samples", "2",
                   "--seq-len", "32")
    assert res.code == 0, res.err
    text = page.read_text()
    assert not re.search(r"""(src|href)=['"](?!data:)""", text)  # self-contained: nothing fetched
    assert "qconvert gptq" in text and "qconvert awq" in text  # each output's command

    dom = _browser(chromium, tmp_path / "p1", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr
    charts = json.loads(re.search(r'data-charts="([^"]*)"', dom.stdout).group(1).replace("&quot;", '"'))
    ids = {c["id"] for c in charts}
    assert {"heatmap-0", "sizes-0", "heatmap-1", "sizes-1", "layers"} <= ids
    assert all(c["ok"] and c["w"] > 100 and c["h"] > 100 for c in charts)

    shot = tmp_path / "shot.png"
    res = _browser(chromium, tmp_path / "p2", f"--screenshot={shot}", page.as_uri())
    assert res.returncode == 0 and shot.is_file(), res.stderr
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    for c in charts:
        if c["y"] + c["h"] > pixels.shape[0]:
            continue  # below the window (the screenshot is one window tall)
        region = pixels[int(c["y"]):int(c["y"] + c["h"]), int(c["x"]):int(c["x"] + c["w"])]
        assert region.std() > 20 and (region < 200).mean() > 0.03, c["id"]  # drawn, not blank
    # the first charts are always within the window
    assert pixels.shape[0] >= charts[0]["y"] + charts[0]["h"]
