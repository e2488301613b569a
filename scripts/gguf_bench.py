"""qconvert gguf against llama.cpp's converter + llama-quantize, side by side on the same input.

For each model: file sizes, byte-identity with llama.cpp, perplexity through llama.cpp itself on the
held-out set, and wall times (qconvert one step HF -> TYPE, versus llama.cpp's convert to bf16 plus
llama-quantize with the same number of threads).

    python scripts/fetch_models.py && bash scripts/build_llama_cpp.sh && . ~/.cache/qconvert/llama.cpp-0.3.36/env.sh
    python scripts/gguf_bench.py [--models smollm2-135m gemma3-270m random-1b] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from qconvert.calibration.datasets import load_texts
from qconvert.testing.llama_cpp import locate

MODELS_DIR = Path(os.environ.get("QCONVERT_MODELS", Path.home() / ".cache/qconvert/models"))
TYPES = ["F16", "Q8_0", "Q4_K_M", "Q4_K_M+imatrix"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def timed(cmd: list[str], env=None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def random_model(path: Path) -> Path:
    """A random-weight Llama with SmolLM2's tokenizer and 1B-class layer shapes (4 layers)."""
    if (path / "config.json").exists():
        return path
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok_dir = MODELS_DIR / "smollm2-135m"
    config = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=2048, intermediate_size=8192,
                                  num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
                                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)
    return path


def bench(name: str, model: Path, work: Path, threads: int, oracle, text: Path, skip_ppl: bool) -> list[str]:
    work.mkdir(parents=True, exist_ok=True)
    qc = [sys.executable, "-m", "qconvert"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    bf16 = work / "llama.cpp-bf16.gguf"
    t_convert = timed([sys.executable, str(oracle.src / "convert_hf_to_gguf.py"), str(model), "--outfile", str(bf16),
                       "--outtype", "bf16"], env={**env, "PYTHONPATH": f"{oracle.src / 'gguf-py'}:{oracle.src}"})
    imatrix = work / "qconvert.imatrix.gguf"
    rows = []
    for type_name in TYPES:
        base_type = type_name.removesuffix("+imatrix")
        ours, ref = work / f"qconvert-{type_name}.gguf", work / f"llama.cpp-{type_name}.gguf"
        args = [str(model), base_type, "-o", str(ours), "--overwrite", "--quiet", "--device", "cpu",
                "--threads", str(threads)]
        if type_name.endswith("+imatrix"):
            # the imatrix comes from qconvert's calibration pass (128 x 512 tokens of `mixed`); both
            # sides quantize with that same file
            timed(qc + ["gguf", str(model), "Q8_0", "-o", str(work / "tmp.gguf"), "--overwrite", "--quiet",
                        "--imatrix", "--save-imatrix", str(imatrix)], env)
            args += ["--imatrix-file", str(imatrix)]
        t_ours = timed(qc + ["gguf", *args], env)
        if base_type == "F16":
            t_ref = timed([sys.executable, str(oracle.src / "convert_hf_to_gguf.py"), str(model), "--outfile", str(ref),
                           "--outtype", "f16"], env={**env, "PYTHONPATH": f"{oracle.src / 'gguf-py'}:{oracle.src}"})
            t_quant = None
        else:
            t_quant = oracle.quantize_file(bf16, ref, base_type, imatrix=imatrix if "+imatrix" in type_name else None,
                                           threads=threads)
            t_ref = t_convert + t_quant
        same = "yes" if sha(ours) == sha(ref) else "NO"
        ppl = "-" if skip_ppl else f"{oracle.perplexity(ours, text, ctx=512, extra_args=('--chunks', '40')):.3f}"
        ratio = f"{t_ref / t_ours:.2f}x"
        if t_quant is not None:  # the quantizer stage alone: qconvert's in-process time against llama-quantize's run
            q_ours = json.loads(Path(f"{ours}.report.json").read_text())["quantize_seconds"]
            ratio += f" (quantize: {q_ours:.1f} s vs llama-quantize {t_quant:.1f} s, {t_quant / q_ours:.2f}x)"
        rows.append(f"| {name} | {type_name} | {ours.stat().st_size / 2**20:.1f} | {same} | {ppl} | "
                    f"{t_ours:.1f} | {t_ref:.1f} | {ratio} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "random-1b"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qconvert-gguf-bench"))
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexity runs (timings and identity only)")
    args = ap.parse_args()
    oracle = locate()
    text = args.work / "heldout.txt"
    args.work.mkdir(parents=True, exist_ok=True)
    text.write_text("\n\n".join(load_texts("heldout")))
    print("| model | type | MiB | identical to llama.cpp | llama.cpp ppl (heldout, 40 x 512) | qconvert s | llama.cpp s "
          "(convert + quantize) | speed ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = random_model(args.work / name) if name.startswith("random") else MODELS_DIR / name
        bench(name, model, args.work / f"{name}-out", args.threads, oracle, text, skip_ppl=args.no_ppl or name.startswith("random"))


if __name__ == "__main__":
    main()
