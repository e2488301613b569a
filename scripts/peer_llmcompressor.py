"""Peer run: llm-compressor 0.14 W4A16 GPTQ or AWQ on CPU, on pre-tokenized calibration windows.

Run with the peer venv's python (not the system one), e.g.

    /work/venvs/llmc/bin/python scripts/peer_llmcompressor.py MODEL gptq OUT --ids ids.pt --group 64 [--dtype float32]

MODEL: a bf16 HF checkpoint. METHOD: gptq (symmetric) or awq (asymmetric, as llm-compressor's
W4A16_ASYM preset). IDS: torch.save'd LongTensor [samples, seq_len], so the peer sees exactly
qconvert's calibration tokens. Writes compressed-tensors (pack-quantized) to OUT and prints
JSON {method, group, dtype, seconds, maxrss_mb}. --dtype: the dtype the model is loaded and calibrated in
(bfloat16 as on a GPU; float32 is what qconvert computes in on a CPU, and is ~1.7x faster on an AVX2-only CPU,
which has no native bf16; never float16: Gemma-3 NaNs). The venv: python -m venv /work/venvs/llmc &&
/work/venvs/llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
"""

import argparse
import json
import resource
import time

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform import AWQModifier
from llmcompressor.pipelines import cache as _cache
from transformers import AutoModelForCausalLM, AutoTokenizer

_cache.IntermediatesCache.pin_memory = lambda self, *a, **k: None  # CPU-only torch cannot pin memory

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("model")
p.add_argument("method", choices=["gptq", "awq"])
p.add_argument("out")
p.add_argument("--ids", required=True, help="torch-saved LongTensor [samples, seq_len]")
p.add_argument("--group", type=int, default=128)
p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
a = p.parse_args()
torch.set_num_threads(2)

symmetric = a.method == "gptq"  # W4A16 is symmetric; AWQ's usual scheme is W4A16_ASYM
weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=a.group, symmetric=symmetric,
                           dynamic=False)
scheme = QuantizationScheme(targets=["Linear"], weights=weights)
if a.group == 128:  # the custom scheme is exactly the preset at its own group size
    assert scheme == preset_name_to_scheme("W4A16" if symmetric else "W4A16_ASYM", ["Linear"])
config = dict(config_groups={"group_0": scheme}, ignore=["lm_head"])
recipe = [GPTQModifier(**config)] if a.method == "gptq" else [AWQModifier(), QuantizationModifier(**config)]

ids = torch.load(a.ids)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
t0 = time.time()
oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0], pipeline="sequential")
seconds = time.time() - t0
model.save_pretrained(a.out, save_compressed=True)
tok.save_pretrained(a.out)
print(json.dumps({"method": a.method, "group": a.group, "dtype": a.dtype, "seconds": round(seconds, 1),
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
