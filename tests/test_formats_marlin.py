"""Marlin (`checkpoint_format: marlin`): the tile/permutation layout against words and scale rows derived by
hand from the kernel's fragment layout, write -> read exact, refusals of what the kernel cannot take, and
rtn/gptq/awq --format marlin end to end. (scripts/verify_marlin_packer.py compares B and s bit for bit with
IST-DASLab's and AutoGPTQ's packers.)"""

import json

import pytest
import torch

from qconvert.algorithms.rtn import RTNConfig, rtn
from qconvert.formats import awq, gptq, marlin
from qconvert.inspect import describe
from qconvert.model.checkpoint import Checkpoint
from qconvert.output import write_config
from qconvert.quantized import QuantizedTensor

NAME = "model.layers.0.mlp.up_proj.weight"
SMALL = ["--samples", "4", "--seq-len", "32", "-q"]
# a tiny llama whose every linear fits the kernel: q/k/v/o [256, 256], gate/up [512, 256], down [256, 512]
FITS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4, head_dim=64)


def random_qt(out, cols, group, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else cols // group
    codes = torch.randint(0, 16, (out, cols), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(out, groups, generator=gen) * 0.05 + 1e-3).half()
    return QuantizedTensor(codes, scale, None, 4, group)


def nibbles(word: int) -> list[int]:
    return [(word >> (4 * i)) & 15 for i in range(8)]


# -- bits on disk, derived by hand --------------------------------------------------------------

def test_words_hold_the_mma_b_fragments():
    """Word w of B row 0 belongs to lane w // 4 and 16x16 tile w % 4 (of the first 4 along n); lane t
    holds k rows 2(t%4), +1, +8, +9 of column t // 4 (+8 for the second n8 half), in the nibble
    order 0,2,4,6,1,3,5,7 of (k0 n0, k1 n0, k8 n0, k9 n0, k0 n8, k1 n8, k8 n8, k9 n8)."""
    n, k = 256, 128
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    B = marlin.pack_weight(codes)
    assert B.dtype == torch.int32 and B.shape == (k // 16, n * 2)
    for word in (0, 1, 3, 4, 37, 127, 128, 300):
        chunk, within = divmod(word, 128)  # 128 words = 4 tiles x 32 lanes
        lane, tile = divmod(within, 4)
        col = 64 * chunk + 16 * tile + lane // 4
        row = 2 * (lane % 4)
        fragment = [(row, col), (row + 1, col), (row + 8, col), (row + 9, col),
                    (row, col + 8), (row + 1, col + 8), (row + 8, col + 8), (row + 9, col + 8)]
        expected = [int(codes[c, r]) for r, c in (fragment[i] for i in (0, 2, 4, 6, 1, 3, 5, 7))]
        assert nibbles(int(B[0, word]) & 0xFFFFFFFF) == expected, word
    # row 1 of B is the next 16 input rows
    assert nibbles(int(B[1, 0]) & 0xFFFFFFFF)[0] == int(codes[0, 16])


def test_scale_rows_follow_the_kernel_order():
    grouped = random_qt(256, 256, 128)
    s = marlin.pack_scale(grouped.scale)
    assert s.shape == (2, 256) and s.dtype == torch.float16
    # grouped: each run of 64 is an 8x8 block transposed
    for j in (0, 1, 7, 8, 9, 63, 64, 65, 200):
        base, r = divmod(j, 64)
        assert s[1, j] == grouped.scale[64 * base + 8 * (r % 8) + r // 8, 1]
    s = marlin.pack_scale(torch.arange(256, dtype=torch.float16)[:, None])  # scale of column c is c
    assert s.shape == (1, 256)
    # one group: runs of 32 hold columns 0,1,8,9,16,17,24,25, then the same + 2, + 4, + 6
    assert s[0, :32].tolist() == [c + 2 * i for i in range(4) for c in (0, 1, 8, 9, 16, 17, 24, 25)]
    assert s[0, 32:40].tolist() == [32, 33, 40, 41, 48, 49, 56, 57]


# -- write -> read ------------------------------------------------------------------------------

def write_marlin(path, qt, group_size, **tensors):
    path.mkdir(parents=True, exist_ok=True)
    writer = marlin.Writer(path, group_size)
    writer.add_quantized(NAME, qt)
    for name, t in tensors.items():
        writer.add_tensor(name, t)
    write_config({"model_type": "llama"}, path, writer.finish())
    return dict(marlin.read(Checkpoint(path)))


@pytest.mark.parametrize("out,cols,group", [(256, 384, 128), (512, 256, -1), (256, 128, 128), (768, 1024, 128)])
def test_write_read_is_exact(tmp_path, out, cols, group):
    qt = random_qt(out, cols, group)
    norm = torch.randn(cols, dtype=torch.bfloat16)
    back = write_marlin(tmp_path, qt, group, **{"model.norm.weight": norm})
    got = back[NAME]
    assert torch.equal(got.codes, qt.codes) and torch.equal(got.scale, qt.scale)
    assert got.zero is None and got.g_idx is None and (got.bits, got.group_size) == (4, group)
    assert torch.equal(back["model.norm.weight"], norm.half())  # dense tensors in the kernel's fp16
    ckpt = Checkpoint(tmp_path)
    assert tuple(ckpt.shape(NAME.replace(".weight", ".B"))) == (cols // 16, out * 2)
    assert tuple(ckpt.shape(NAME.replace(".weight", ".s"))) == (1 if group == -1 else cols // 128, out)
    config = json.loads((tmp_path / "quantize_config.json").read_text())
    assert config == json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (config["checkpoint_format"], config["quant_method"], config["bits"], config["group_size"],
            config["sym"], config["desc_act"]) == ("marlin", "gptq", 4, group, True, False)
    info = describe(tmp_path)["quantization"]
    assert info["format"] == "marlin" and info["modules"] == {NAME.removesuffix(".weight"): f"int4 {'channel' if group == -1 else 'g128'} sym marlin"}


@pytest.mark.parametrize("qt,fragment", [
    (random_qt(256, 128, 64), "group size 64 differs"),
    (QuantizedTensor(torch.zeros(256, 256, dtype=torch.uint8), torch.ones(256, 2).half(),
                     torch.full((256, 2), 3, dtype=torch.uint8), 4, 128), "symmetric 4-bit codes only, got asymmetric"),
    (QuantizedTensor(torch.zeros(256, 256, dtype=torch.uint8), torch.ones(256, 2).half(), None, 8, 128),
     "symmetric 4-bit codes only, got symmetric 8-bit"),
    (QuantizedTensor(random_qt(256, 256, 128).codes, torch.ones(256, 2).half(), None, 4, 128,
                     g_idx=torch.arange(256, dtype=torch.int32).flip(0) // 128), "no act-order"),
    (random_qt(640, 256, 128), "out % 256 == 0 (the kernel's smallest tile), got out 640, in 256"),
    (random_qt(256, 192, -1), "got out 256, in 192"),
])
def test_writer_refuses_what_the_kernel_cannot_take(tmp_path, qt, fragment):
    writer = marlin.Writer(tmp_path, -1 if qt.group_size == -1 else 128)
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj: ") as info:
        writer.add_quantized(NAME, qt)
    assert fragment in str(info.value)


# -- the commands ---------------------------------------------------------------------------------

def dequantized(path, reader) -> dict[str, torch.Tensor]:
    return {n: t.dequantize() for n, t in reader(Checkpoint(path)) if isinstance(t, QuantizedTensor)}


@pytest.mark.parametrize("method,flags,twin_format,twin_reader", [
    ("rtn", ["--group", "128"], None, None),
    ("rtn", ["--group", "-1"], None, None),
    ("gptq", ["--group", "128"], "gptq", gptq.read),  # act-order with static groups: no g_idx
    ("awq", ["--group", "128", "--no-zero-point"], "awq", awq.read),
])
def test_commands_write_marlin(tiny, qconvert, tmp_path, method, flags, twin_format, twin_reader):
    model = tiny("llama", **FITS)
    out = tmp_path / "marlin"
    res = qconvert(method, model, "-o", out, "--format", "marlin", *flags, *(SMALL if method == "rtn" else [*SMALL]))
    assert res.code == 0, res.err
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["checkpoint_format"] == "marlin" and config["desc_act"] is False
    assert (out / "quantize_config.json").exists()
    got = dequantized(out, marlin.read)
    assert len(got) == 2 * 7 and all(t.dtype == torch.float16 for t in got.values())
    if twin_format is None:  # rtn: exactly qconvert's RTN of the source weights with fp16 scales
        src = Checkpoint(model)
        group = int(flags[1])
        want = {n: rtn(src.get(n), RTNConfig(4, group, True), scale_dtype=torch.float16).dequantize() for n in got}
    else:  # the same conversion in the method's own layout
        twin = tmp_path / "twin"
        res = qconvert(method, model, "-o", twin, "--format", twin_format, *flags, *SMALL)
        assert res.code == 0, res.err
        want = dequantized(twin, twin_reader)
    assert want.keys() == got.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name
    if method == "rtn" and flags[1] == "128":
        res = qconvert("eval", out, "--base", model, "--samples", "2", "--seq-len", "32", "--json")
        assert res.code == 0 and res.json()["kl_divergence"] < 0.1, res.err


@pytest.mark.parametrize("args,fragment", [
    (["rtn", "--asym"], "--format marlin is symmetric (zero point fixed at 8): use --sym"),
    (["rtn", "--group", "64"], "--format marlin stores 4-bit codes in groups of 128 or per channel"),
    (["rtn", "--w-bit", "8"], "not --w-bit 8 --group 128"),
    (["gptq", "--dynamic-groups"], "--format marlin has no act-order g_idx: use --static-groups"),
    (["awq"], "use --no-zero-point"),
])
def test_commands_refuse_settings_marlin_cannot_hold(tiny, qconvert, tmp_path, args, fragment):
    out = tmp_path / "out"
    res = qconvert(args[0], tiny("llama", **FITS), "-o", out, "--format", "marlin", *args[1:], *SMALL)
    assert res.code == 2 and fragment in res.err, res.err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_commands_refuse_shapes_naming_the_layer(tiny, qconvert, tmp_path):
    # the default tiny llama (hidden 128, intermediate 256, 2 kv heads of 32): only gate/up [256, 128] fit;
    # the first misfit in file order is down_proj [128, 256]
    out = tmp_path / "out"
    res = qconvert("rtn", tiny("llama"), "-o", out, "--format", "marlin", *SMALL)
    assert res.code == 2, res.err
    assert "model.layers.0.mlp.down_proj: Marlin needs in % 128 == 0 and out % 256 == 0" in res.err, res.err
    assert "got out 128, in 256 (9 other linears do not fit either)" in res.err, res.err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
