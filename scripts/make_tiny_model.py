"""Write a tiny random-weight model (with a small BPE tokenizer) to try qconvert offline.

    python scripts/make_tiny_model.py OUT [--arch llama|mistral|qwen2|qwen3|gemma2|gemma3_text|phi3|mixtral|qwen2_moe|qwen3_moe] [--layers N]
"""

import argparse
from pathlib import Path

from qconvert.testing.tiny_models import ARCHITECTURES, make_tiny_model

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("out", type=Path)
ap.add_argument("--arch", default="llama", choices=ARCHITECTURES)
ap.add_argument("--layers", type=int, default=2)
args = ap.parse_args()
print(make_tiny_model(args.out, args.arch, args.layers))
