"""qconvert GPTQ in-process on the w4_gpu_bench model (/tmp/m8, LAYERS decoder layers), printing each layer's
seconds with this process's resident memory as it goes, then the summary (whole-run seconds, peaks; the host peak includes building the model in this process when
/tmp/m8 does not exist yet). It produced the 23.7 s side-by-side 32-layer figure in the README, followed in the
same call by `LAYERS=32 python ../shared/bench/peer_llmcompressor_gpu.py gptq`:

    python scripts/w4_gpu_depth.py 32   # on the GPU machine, with .whl and .peer carried (see w4_gpu_run.sh)
"""
import sys, torch, re
from pathlib import Path
sys.path.insert(0, "scripts")
import w4_gpu_bench as B
B.make_model(int(sys.argv[1]), Path(".peer/tok")); B.calibration_ids(Path("/tmp/ids.pt"))
from qconvert.pipeline import Request, Calibration, run
from qconvert.algorithms.gptq import GPTQConfig
def rss():
    s = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", s).group(1)) // 1024 for k in ("VmRSS", "RssAnon", "RssFile")}  # MiB
def on_layer(r):
    st = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    print(r.index, round(r.seconds, 2), rss(), {k: v // 2**20 for k, v in st.items() if "allocated_bytes.current" in k or "reserved_bytes.current" in k})
req = Request("/tmp/m8", Path("/tmp/probe"), "gptq", GPTQConfig(), Calibration("/tmp/ids.pt"), "cuda", True, format="compressed-tensors")
s = run(req, on_layer)
print("seconds", s["seconds"], s["peak_memory"])
