"""Perplexity, and KL divergence / top-1 agreement of next-token distributions against a base model."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EvalResult:
    tokens: int
    windows: int
    perplexity: float
    base_perplexity: float | None = None
    kl_divergence: float | None = None  # mean over predicted tokens of KL(base || model), nats
    top1_agreement: float | None = None  # fraction of positions where both argmaxes agree


@torch.no_grad()
def _log_probs(model, window: torch.Tensor) -> torch.Tensor:
    logits = model(window.to(model.device)).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, base=None) -> EvalResult:
    """Score `model` on token windows [N, T] (each predicting tokens 1..T-1), one window at a time."""
    nll = base_nll = kl = agree = 0.0
    count = 0
    for window in windows.split(1):
        targets = window[:, 1:].to(model.device)
        logp = _log_probs(model, window)
        nll -= float(logp.gather(-1, targets[..., None]).sum())
        count += targets.numel()
        if base is not None:
            base_logp = _log_probs(base, window).to(logp.device)
            base_nll -= float(base_logp.gather(-1, targets[..., None]).sum())
            kl += float((base_logp.exp() * (base_logp - logp)).sum())
            agree += float((base_logp.argmax(-1) == logp.argmax(-1)).sum())
    result = EvalResult(tokens=count, windows=len(windows), perplexity=float(torch.tensor(nll / count).exp()))
    if base is not None:
        result.base_perplexity = float(torch.tensor(base_nll / count).exp())
        result.kl_divergence = kl / count
        result.top1_agreement = agree / count
    return result
