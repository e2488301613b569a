"""Per-tensor types of the k-quant / legacy mixtures are the ones llama-quantize picks."""

import numpy as np
import pytest
from gguf import GGUFReader, GGMLQuantizationType

from qconvert.formats.gguf import imatrix
from qconvert.formats.gguf.mixtures import FILE_TYPES, ModelFacts, TensorInfo, quantizer_order, tensor_types

FTYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L",
          "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "F16", "BF16"]
MODELS = {
    # 16 layers of a k-quant-friendly width: exercises the every-third-layer rules
    "llama-wide": ("llama", 16, dict(hidden_size=256, intermediate_size=512, head_dim=64,
                                     num_attention_heads=4, num_key_value_heads=1)),
    # rows of 128 and 384: the fallbacks to 32-blocks (and output to Q8_0)
    "llama-narrow": ("llama", 3, dict(intermediate_size=384)),
    # fused qkv: counted as attn_v
    "phi3": ("phi3", 9, dict(hidden_size=256, intermediate_size=512, head_dim=64, num_key_value_heads=4)),
    "gemma3": ("gemma3_text", 4, dict(hidden_size=256, intermediate_size=512, head_dim=64, tie_word_embeddings=True)),
    # 8 experts: the Mixtral special cases
    "mixtral-8": ("mixtral", 3, dict(hidden_size=256, intermediate_size=256, num_local_experts=8, head_dim=64)),
}


@pytest.fixture(scope="module")
def f32_files(oracle, tmp_path_factory):
    from qconvert.testing.tiny_models import make_tiny_model

    files = {}
    for key, (arch, layers, overrides) in MODELS.items():
        d = tmp_path_factory.mktemp(key)
        make_tiny_model(d / "hf", arch, layers, tokenizer="sentencepiece", **overrides)
        oracle.convert_hf(d / "hf", d / "f32.gguf", "f32")
        files[key] = d
    return files


def _facts(reader: GGUFReader) -> ModelFacts:
    f = reader.fields
    arch = bytes(f["general.architecture"].parts[-1]).decode()

    def u32(key, default=0):
        k = f"{arch}.{key}"
        return int(f[k].parts[-1][0]) if k in f else default

    return ModelFacts(arch, u32("block_count"), u32("attention.head_count"), u32("attention.head_count_kv"),
                      u32("expert_count"))


def _random_imatrix(reader: GGUFReader, path):
    """An imatrix written by our writer for every matrix: llama-quantize must accept it."""
    rng = np.random.default_rng(0)
    entries = {}
    for t in reader.tensors:
        if len(t.shape) >= 2 and t.shape[1] > 1:
            n_mat = int(t.shape[2]) if len(t.shape) == 3 else 1
            entries[t.name] = imatrix.Entry(rng.random(n_mat * int(t.shape[0]), dtype=np.float32),
                                            np.full(n_mat, 64))
    imatrix.write(path, imatrix.Imatrix(entries, ["test"], 1, 64))
    return path


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("ftype", FTYPES + ["Q4_0+imatrix", "Q5_0+imatrix"])
def test_types_match_llama_quantize(oracle, f32_files, model, ftype):
    d = f32_files[model]
    out = d / f"{ftype}.gguf"
    src = GGUFReader(str(d / "f32.gguf"))
    # Q2_K_S refuses to run without an imatrix; Q4_0/Q5_0 change ffn_down types with one
    with_imatrix = ftype.endswith("+imatrix") or ftype == "Q2_K_S"
    ftype = ftype.removesuffix("+imatrix")
    im = _random_imatrix(src, d / "imatrix.gguf") if with_imatrix else None
    oracle.quantize_file(d / "f32.gguf", out, ftype, imatrix=im)
    infos = [TensorInfo(t.name, tuple(int(x) for x in t.shape), GGMLQuantizationType(t.tensor_type))
             for t in src.tensors]
    ours = tensor_types(infos, FILE_TYPES[ftype], _facts(src), has_imatrix=with_imatrix)
    theirs = {t.name: GGMLQuantizationType(t.tensor_type) for t in GGUFReader(str(out)).tensors}
    assert {n: t.name for n, t in ours.items()} == {n: t.name for n, t in theirs.items()}
    assert [t.name for t in GGUFReader(str(out)).tensors] == quantizer_order([t.name for t in infos])
