"""Does a real consumer compute what our reader says an AWQ / GPTQ output holds?

    python scripts/verify_consumers.py OUT_DIR [--base BASE_DIR] [--dtype float16]

Loads OUT_DIR with transformers.AutoModelForCausalLM (on CPU that goes through gptqmodel's torch
QuantLinear kernels, so run it where gptqmodel and optimum are installed) and with our own reader
(qconvert.eval.loader.load_model: read, dequantize, dense model), runs one fixed token batch through
both and prints the comparison as JSON. --base adds the unquantized model's distance, to show the
quantization is visible at all. Exit status 1 when the consumer's own dequantized weights differ from
ours at all (both are (q - z) * s from the same fp16 scale, so they must be equal), or when the logits
disagree beyond half-precision noise: top-1 agreement below TOP1_MIN or mean KL above KL_MAX.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from qconvert.eval.loader import load_model

# Both sides dequantize to the same weights ((q - z) * s is exact before its one rounding), so the
# logits differ only by the kernels' arithmetic: gptqmodel's CPU int4 kernels (TorchAten*) round the
# fp16 scales to bf16 and multiply in bf16, which on the tiny models gives KL ~1e-5 and, where two
# logits nearly tie, one top-1 flip in 64; 8-bit and other bit widths give KL ~1e-7. The bounds sit an
# order of magnitude above that and far below what a wrong nibble order or zero offset does (weights
# off by whole steps, KL ~1e-2 or more, top-1 near what the unquantized model gets: ~0.5).
KL_MAX = 1e-4
TOP1_MIN = 0.9


def compare(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """Distances of `other` logits from `ref` logits, both [batch, seq, vocab]."""
    ref, other = ref.float(), other.float()
    kl = F.kl_div(other.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {
        "max_abs_diff": (ref - other).abs().max().item(),
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "top1_agreement": (ref.argmax(-1) == other.argmax(-1)).float().mean().item(),
    }


def kernels(model) -> list[str]:
    """The classes transformers put in place of the quantized linears."""
    return sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})


def weight_diff(theirs, ours) -> float | None:
    """Largest |difference| between the consumer's own dequantized weights and ours, over every quantized
    linear; must run before the first forward (the CPU kernels repack qweight then). None when the
    consumer class offers no dequantization (gptqmodel: dequantize_weight for GPTQ, awq_weight_dequantize
    for AWQ, both [in, out])."""
    mine = dict(ours.named_modules())
    worst = 0.0
    for name, m in theirs.named_modules():
        if not hasattr(m, "qweight"):
            continue
        if hasattr(m, "dequantize_weight"):
            w = m.dequantize_weight()
        elif hasattr(m, "awq_weight_dequantize"):
            w = m.awq_weight_dequantize("cpu", mine[name].weight.dtype)
        else:
            return None
        ref = mine[name].weight
        worst = max(worst, (w.T.to(ref.dtype).float() - ref.float()).abs().max().item())
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--base", help="the unquantized source checkpoint")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--seq-len", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dtype = getattr(torch, args.dtype)
    cpu = torch.device("cpu")

    theirs = AutoModelForCausalLM.from_pretrained(args.out_dir, device_map="cpu", dtype=dtype).eval()
    ours, _ = load_model(args.out_dir, dtype, cpu)
    vocab = ours.config.vocab_size
    ids = torch.randint(3, vocab, (2, args.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weights = weight_diff(theirs, ours)
        ref, got = ours(ids).logits, theirs(ids).logits
        result = {"out_dir": args.out_dir, "dtype": args.dtype, "consumer_kernels": kernels(theirs),
                  "weights_max_abs_diff": weights, "consumer_vs_ours": compare(ref, got)}
        if args.base:
            base, _ = load_model(args.base, dtype, cpu)
            result["base_vs_ours"] = compare(base(ids).logits, ref)
    cmp = result["consumer_vs_ours"]
    result["ok"] = (cmp["kl_mean"] <= KL_MAX and cmp["top1_agreement"] >= TOP1_MIN
                    and weights in (None, 0.0))
    result["tolerance"] = {"weights_max_abs_diff": 0.0, "kl_mean_max": KL_MAX, "top1_min": TOP1_MIN}
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
