"""Peak memory of a conversion is one block plus activations: it does not grow with depth."""

import subprocess
import sys

WIDE = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4, head_dim=64)
DRIVER = """
import resource, sys
from qconvert import cli
code = cli.run(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def _peak_rss_mb(model, out) -> float:
    args = ["rtn", str(model), "-o", str(out), "--dataset", "mixed", "--samples", "8", "--seq-len", "64",
            "--device", "cpu", "-q"]
    res = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, check=True)
    kb = next(int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("PEAK_KB"))
    return kb / 1024


def test_peak_memory_does_not_grow_with_depth(tiny, tmp_path):
    shallow, deep = tiny("llama", layers=4, **WIDE), tiny("llama", layers=16, **WIDE)
    extra_mb = sum(p.stat().st_size for p in deep.glob("*.safetensors")) / 2**20 - \
        sum(p.stat().st_size for p in shallow.glob("*.safetensors")) / 2**20
    peak_shallow = _peak_rss_mb(shallow, tmp_path / "a")
    peak_deep = _peak_rss_mb(deep, tmp_path / "b")
    print(f"12 extra layers: {extra_mb:.0f} MiB on disk; peak RSS {peak_shallow:.0f} -> {peak_deep:.0f} MiB")
    # loading the extra layers at once would add at least their bf16 size (and twice that in fp32)
    assert peak_deep - peak_shallow < 0.25 * extra_mb


def test_without_calibration_a_block_is_read_one_linear_at_a_time(tiny, tmp_path, monkeypatch, qconvert):
    """Nothing runs through the blocks, so no block is held whole: what bounds memory for a checkpoint larger
    than RAM (scripts/larger_than_ram.py measures it on 31.6 GB)."""
    from qconvert.model.checkpoint import Checkpoint

    model = tiny("llama", layers=2, **WIDE)
    loads, load = [], Checkpoint.load
    monkeypatch.setattr(Checkpoint, "load", lambda self, names, check=True: loads.append(list(names)) or
                        load(self, names, check))
    assert qconvert("rtn", model, "-o", tmp_path / "o", "--device", "cpu", "-q").code == 0
    in_blocks = [names for names in loads if any(".layers." in n for n in names)]
    assert in_blocks and all(len(names) == 1 for names in in_blocks)
