"""qconvert's HF -> GGUF conversion against llama.cpp's own convert_hf_to_gguf.py (llama-cpp-python 0.3.36):
on tiny models of every supported family the two GGUF files must be byte-identical, for --outtype f32,
f16 and bf16.

llama.cpp's converter runs in one subprocess for all models (its import takes most of the time). Tiny
byte-level BPE tokenizers have a probe hash llama.cpp does not know, so for those models both sides get
the same extra hash -> pre-tokenizer entry (llama.cpp through a patched get_vocab_base_pre, qconvert
through its PRE_TOKENIZERS table); the real-model check at the end runs llama.cpp unpatched.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from qconvert.formats.gguf.convert import SafetensorsLoader, UnknownPreTokenizer, convert, plan, tensor_data
from qconvert.formats.gguf.convert import pre_tokenizers
from qconvert.formats.gguf.convert.tokenizer import probe_hash
from qconvert.testing.tiny_models import make_tiny_model

OUTTYPES = ("f32", "f16", "bf16")

def _added_tokens(model_dir: Path) -> None:
    """Added tokens (special, look-special, user-defined, not normalized), also in the transformers-4
    places (tokenizer_config added_tokens_decoder, added_tokens.json), and add_bos/add_eos flags."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.add_tokens(["<|im_start|>", "hello world", "\u2581xyz", AddedToken("<sep>", normalized=False)])
    tok.save_pretrained(model_dir)
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in tj["added_tokens"]}
    cfg.update(add_bos_token=True, add_eos_token=False)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model_dir / "added_tokens.json").write_text(json.dumps({"<extra_0>": 517}))


def _byte_level(model_dir: Path) -> None:
    """Qwen-style: a ByteLevel post-processor (adds nothing) that overrides tokenizer_config's add_bos_token."""
    _added_tokens(model_dir)
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    (model_dir / "tokenizer.json").write_text(json.dumps(tj))


def _sharded(model_dir: Path, n: int = 3) -> None:
    """Re-save the checkpoint as n shards with an index, tensors dealt out so that a layer's experts
    are spread over several files."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {name: files[i % n] for i, name in enumerate(sorted(tensors, reverse=True))}
    for file in files:
        save_file({k: v for k, v in tensors.items() if weight_map[k] == file}, model_dir / file, metadata={"format": "pt"})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _model_card(model_dir: Path) -> None:
    """A model card and sampling defaults: general.* metadata (license, tags, base model, languages,
    sampling.*, repetition_penalty -> penalty_repeat, which gguf 0.19 from PyPI does not map)."""
    (model_dir / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage:\n- en\n- fr\ntags:\n- tiny\n- test\nbase_model: someorg/Tiny-Base-1B\n"
        "datasets:\n- someorg/some-data\npipeline_tag: text-generation\n---\n# Tiny\n")
    gen = json.loads((model_dir / "generation_config.json").read_text())
    gen.update(top_k=20, top_p=0.8, temperature=0.7, repetition_penalty=1.05)
    (model_dir / "generation_config.json").write_text(json.dumps(gen))


PHI3_LONGROPE = dict(max_position_embeddings=4096, original_max_position_embeddings=1024, rope_parameters={
    "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
    "long_factor": [1.0 + i / 16 for i in range(16)], "short_factor": [1.0 - i / 64 for i in range(16)]})

# name -> (make_tiny_model arch, tokenizer kind, pre-tokenizer name given to the tiny BPE's unknown
#          hash, config overrides (+ "dtype"), post-processing of the saved model)
# (transformers' Qwen2Tokenizer adds <|endoftext|> as id 512, so BPE Qwen models get 520 rows)
MODELS = {
    "llama": ("llama", "sentencepiece", None, {}, None),
    "llama-spm-added-tokens": ("llama", "sentencepiece", None, dict(vocab_size=520), _added_tokens),
    "llama-bpe-tied-llama3rope": ("llama", "bpe", "llama-bpe", dict(
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), None),
    "mistral-7B-Instruct-v0.3-model-card": ("mistral", "sentencepiece", None, {}, _model_card),
    "mixtral": ("mixtral", "sentencepiece", None, {}, None),
    "mixtral-sharded": ("mixtral", "sentencepiece", None, {}, _sharded),
    "qwen2": ("qwen2", "sentencepiece", None, {}, None),
    "qwen2-bpe": ("qwen2", "bpe", "qwen2", dict(vocab_size=520), None),
    "qwen3": ("qwen3", "sentencepiece", None, {}, None),
    "qwen3-bpe-bytelevel": ("qwen3", "bpe", "qwen2", dict(vocab_size=520), _byte_level),
    "qwen2_moe": ("qwen2_moe", "bpe", "qwen2", dict(vocab_size=520), None),
    "qwen2_moe-sharded": ("qwen2_moe", "bpe", "qwen2", dict(vocab_size=520), _sharded),
    "qwen3_moe": ("qwen3_moe", "bpe", "qwen2", dict(vocab_size=520), None),
    "gemma2": ("gemma2", "sentencepiece", None, {}, None),
    "gemma3_text": ("gemma3_text", "sentencepiece", None, {}, None),
    "gemma3_text-bpe-f16-trimmed": ("gemma3_text", "bpe", "llama-bpe", dict(vocab_size=520, dtype="float16"), None),
    "phi3": ("phi3", "sentencepiece", None, {}, None),
    "phi3-longrope-added-tokens": ("phi3", "sentencepiece", None, dict(vocab_size=520, **PHI3_LONGROPE), _added_tokens),
}


_REFERENCE_RUNNER = r'''
import json, sys
from hashlib import sha256
jobs, extra, probe = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
sys.argv = ["convert_hf_to_gguf.py"]
import convert_hf_to_gguf as cli
from conversion import base
original = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    digest = sha256(str(tokenizer.encode(probe)).encode()).hexdigest()
    return extra[digest] if digest in extra else original(self, tokenizer)
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
for model_dir, out, outtype in jobs:
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", outtype]
    cli.main()
'''


def run_reference(src: Path, jobs: list[tuple[str, str, str]], extra_hashes: dict[str, str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), str(src)])}
    proc = subprocess.run([sys.executable, "-c", _REFERENCE_RUNNER, json.dumps(jobs), json.dumps(extra_hashes),
                           json.dumps(pre_tokenizers.PROBE_TEXT)], cwd=src, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed:\n{proc.stderr[-6000:]}")


def bpe_probe_hash(model_dir: Path) -> str:
    from transformers import AutoTokenizer
    return probe_hash(AutoTokenizer.from_pretrained(model_dir).encode(pre_tokenizers.PROBE_TEXT))


def gguf_differences(ref_path: Path, our_path: Path) -> list[str]:
    """Human-readable differences between two GGUF files: KV (order, types, values), tensors (order,
    names, types, shapes, bytes)."""
    a, b = gguf.GGUFReader(ref_path), gguf.GGUFReader(our_path)
    out = []
    fa = [(f.name, [t.name for t in f.types], f.contents()) for f in a.fields.values()]
    fb = [(f.name, [t.name for t in f.types], f.contents()) for f in b.fields.values()]
    if [x[0] for x in fa] != [x[0] for x in fb]:
        out.append(f"KV keys/order differ:\n  llama.cpp {[x[0] for x in fa]}\n  qconvert  {[x[0] for x in fb]}")
    db = {x[0]: x for x in fb}
    for key, types, value in fa:
        if key in db and (types, value) != tuple(db[key][1:]):
            out.append(f"KV {key}: llama.cpp {types} {str(value)[:120]!r} / qconvert {db[key][1]} {str(db[key][2])[:120]!r}")
    ta = [(t.name, t.tensor_type.name, [int(n) for n in t.shape]) for t in a.tensors]
    tb = [(t.name, t.tensor_type.name, [int(n) for n in t.shape]) for t in b.tensors]
    if ta != tb:
        out.append(f"tensor list differs:\n  llama.cpp {ta}\n  qconvert  {tb}")
    tensors_b = {t.name: t for t in b.tensors}
    for t in a.tensors:
        u = tensors_b.get(t.name)
        if u is not None and np.asarray(t.data).tobytes() != np.asarray(u.data).tobytes():
            out.append(f"tensor {t.name}: data differs")
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def converted(oracle, tmp_path_factory):
    """{(model, outtype): (llama.cpp file, qconvert file)} for every tiny model and output type, and
    {model: its checkpoint directory} under the key "dirs"."""
    src = oracle.src
    root = tmp_path_factory.mktemp("gguf_convert")
    extra: dict[str, str] = {}
    jobs, pairs = [], {}
    import torch
    for name, (arch, tok, pre, overrides, post) in MODELS.items():
        overrides = dict(overrides)
        dtype = getattr(torch, overrides.pop("dtype", "bfloat16"))
        model_dir = make_tiny_model(root / name, arch, 2, dtype=dtype, tokenizer=tok, **overrides)
        if post is not None:
            post(model_dir)
        if pre is not None:
            extra[bpe_probe_hash(model_dir)] = pre
        for outtype in OUTTYPES:
            ref, ours = root / f"{name}.{outtype}.llama_cpp.gguf", root / f"{name}.{outtype}.qconvert.gguf"
            jobs.append((str(model_dir), str(ref), outtype))
            pairs[(name, outtype)] = (model_dir, ref, ours)
    run_reference(src, jobs, extra)
    saved = dict(pre_tokenizers.PRE_TOKENIZERS)
    pre_tokenizers.PRE_TOKENIZERS.update({h: (n, "test") for h, n in extra.items()})
    try:
        for (name, outtype), (model_dir, ref, ours) in pairs.items():
            convert(model_dir, ours, outtype.upper())
    finally:
        pre_tokenizers.PRE_TOKENIZERS.clear()
        pre_tokenizers.PRE_TOKENIZERS.update(saved)
    files = {k: (ref, ours) for k, (_, ref, ours) in pairs.items()}
    files["dirs"] = {name: pairs[(name, OUTTYPES[0])][0] for name in MODELS}
    return files


@pytest.mark.parametrize("outtype", OUTTYPES)
@pytest.mark.parametrize("model", list(MODELS))
def test_byte_identical_to_llama_cpp(converted, model, outtype):
    ref, ours = converted[(model, outtype)]
    assert gguf_differences(ref, ours) == []
    assert _sha(ref) == _sha(ours)


def test_features_are_exercised(converted):
    """The variants above do cover what they are meant to."""
    def reader(model):
        return gguf.GGUFReader(converted[(model, "bf16")][1])
    names = {m: {t.name for t in reader(m).tensors} for m in ("llama", "llama-bpe-tied-llama3rope", "mixtral",
                                                               "qwen2_moe", "gemma3_text-bpe-f16-trimmed")}
    assert "output.weight" in names["llama"] and "output.weight" not in names["llama-bpe-tied-llama3rope"]
    assert "rope_freqs.weight" in names["llama-bpe-tied-llama3rope"]
    assert {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_down_exps.weight", "blk.0.ffn_up_exps.weight"} <= names["mixtral"]
    assert {"blk.1.ffn_gate_inp_shexp.weight", "blk.1.ffn_up_shexp.weight"} <= names["qwen2_moe"]
    r = reader("gemma3_text-bpe-f16-trimmed")
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert [int(n) for n in embd.shape] == [128, 515]  # 512 BPE + 3 added tokens (counted twice, as llama.cpp does)
    types = {t.name: t.tensor_type.name for t in reader("qwen2_moe").tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_q.bias"] == "F32"
    assert types["blk.0.ffn_down_exps.weight"] == "BF16"


def test_q_k_permutation_is_llama_rope_order(converted):
    """attn_q rows in GGUF = HF rows regrouped per head as (even halves, odd halves) interleaved."""
    p = plan(converted["dirs"]["llama"])
    loader = SafetensorsLoader(p.model_dir)
    spec = next(s for s in p.tensors if s.gguf_name == "blk.0.attn_q.weight")
    hf = loader("model.layers.0.self_attn.q_proj.weight").float()
    ours = tensor_data(spec, loader)
    head_dim = hf.shape[0] // 4
    for h in range(4):
        block = hf[h * head_dim:(h + 1) * head_dim]
        expected = block.reshape(2, head_dim // 2, -1).transpose(0, 1).reshape(head_dim, -1)
        assert (ours[h * head_dim:(h + 1) * head_dim] == expected).all()


def test_unknown_bpe_pre_tokenizer_is_refused_with_its_hash(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "qwen2_moe", 1)
    with pytest.raises(UnknownPreTokenizer, match=bpe_probe_hash(model_dir)):
        plan(model_dir)


def test_file_type_depends_on_output_type(converted):
    for outtype, ftype in (("f32", 0), ("f16", 1), ("bf16", 32)):
        field = gguf.GGUFReader(converted[("qwen3", outtype)][1]).get_field("general.file_type")
        assert field.contents() == ftype


REAL_MODELS = {"smollm2-135m": "smollm", "gemma3-270m": None}


@pytest.mark.slow  # minutes; run with `pytest -m slow` after scripts/fetch_models.py
@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_real_model_bf16_byte_identical(oracle, tmp_path, name):
    model_dir = Path.home() / ".cache/qconvert/models" / name
    if not (model_dir / "config.json").is_file():
        pytest.fail(f"{model_dir} not downloaded (python scripts/fetch_models.py)")
    ref = tmp_path / "ref.gguf"
    oracle.convert_hf(model_dir, ref, "bf16")
    ours = convert(model_dir, tmp_path / "ours.gguf", "BF16")
    assert gguf_differences(ref, ours) == []
    assert _sha(ref) == _sha(ours)


def test_float_encodings_match_gguf_py_bit_for_bit():
    """F16 / BF16 rounding (incl. overflow, denormals, NaN payloads) = gguf-py's, which llama.cpp uses."""
    import torch
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    from qconvert.formats.gguf.convert import encode_float
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F800001, 0xFFFFFFFF, 0x7F7FFFFF, 0x3F808000,
                        0x3F818000, 0x00008000, 0x00018000, 0x477FF000, 0x33000001], dtype=np.uint32)
    a = np.concatenate([bits, special]).view(np.float32).reshape(-1, 1)
    with np.errstate(over="ignore"):
        for qtype in (Q.F16, Q.BF16):
            ours = encode_float(torch.from_numpy(a), qtype)
            assert np.asarray(ours).view(np.uint16).tobytes() == quantize(a, qtype).view(np.uint16).tobytes()
