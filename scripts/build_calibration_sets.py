"""Rebuild calibration_sets/ from the public-domain / PSF texts in ../shared/text.

Each source is cut into passages of about 2,000 characters at paragraph boundaries, the passages
are shuffled with a fixed seed, and disjoint slices go to the calibration set (`mixed`) and to
the held-out evaluation set (`heldout`), so no passage is both calibrated on and evaluated on.

    python scripts/build_calibration_sets.py [--text-dir ../shared/text]
"""

import argparse
import json
import random
from pathlib import Path

# source file -> (characters for calibration, characters held out)
BUDGET = {
    "kjv.txt": (110_000, 40_000),
    "jargon.txt": (110_000, 40_000),
    "pydocs.txt": (110_000, 40_000),
    "alice.txt": (60_000, 30_000),
}
PASSAGE_CHARS = 2_000


def passages(text: str) -> list[str]:
    out, cur = [], []
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        cur.append(para)
        if sum(map(len, cur)) >= PASSAGE_CHARS:
            out.append("\n\n".join(cur))
            cur = []
    if cur:
        out.append("\n\n".join(cur))
    return out


def take(items: list[str], budget: int) -> tuple[list[str], list[str]]:
    taken, used = [], 0
    while items and used < budget:
        taken.append(items.pop())
        used += len(taken[-1])
    return taken, items


def main() -> None:
    ap = argparse.ArgumentParser()
    root = Path(__file__).resolve().parents[1]
    ap.add_argument("--text-dir", type=Path, default=root.parent / "shared" / "text")
    ap.add_argument("--out-dir", type=Path, default=root / "calibration_sets")
    args = ap.parse_args()
    sets = {"mixed": [], "heldout": []}
    for name, (n_cal, n_eval) in BUDGET.items():
        items = passages((args.text_dir / name).read_text(encoding="utf-8"))
        random.Random(f"qconvert:{name}").shuffle(items)
        cal, rest = take(items, n_cal)
        held, _ = take(rest, n_eval)
        sets["mixed"] += [{"text": t, "source": name} for t in cal]
        sets["heldout"] += [{"text": t, "source": name} for t in held]
    for set_name, rows in sets.items():
        random.Random(set_name).shuffle(rows)
        path = args.out_dir / f"{set_name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} passages, {sum(len(r['text']) for r in rows)} characters")


if __name__ == "__main__":
    main()
