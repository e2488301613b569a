"""Score one output against its base on held-out text (what `qconvert eval` and `qconvert report` run)."""

from __future__ import annotations

from dataclasses import asdict

import torch

from qconvert.calibration.datasets import load_texts
from qconvert.calibration.tokens import evaluation_windows
from qconvert.eval.loader import load_model
from qconvert.eval.metrics import evaluate


def score(model: str, base: str | None, dataset: str = "heldout", samples: int = 40, seq_len: int = 512,
          device: str = "auto") -> dict:
    """Perplexity (and with a base: KL divergence, top-1 agreement) as a dict, with what was scored."""
    from qconvert.pipeline import resolve_device

    dev, _ = resolve_device(device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    quant, tokenizer = load_model(model, dtype, dev)
    base_model = load_model(base, dtype, dev)[0] if base else None
    windows = evaluation_windows(load_texts(dataset, tokenizer), tokenizer, samples, seq_len)
    result = asdict(evaluate(quant, windows, base_model))
    result.update(model=model, base=base, dataset=dataset, samples=samples, seq_len=seq_len)
    return result
