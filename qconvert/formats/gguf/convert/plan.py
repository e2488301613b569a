"""plan(model_dir): everything llama.cpp's converter would put in the GGUF file, before any data is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from .architectures import FILE_TYPE, family_for, load_hparams
from .kv import KVItem, KVList
from .metadata import general_kv
from .tensors import TensorSpec, parameter_counts, plan_tensors
from .special_tokens import clear_caches
from .tokenizer import VOCABS

# --outtype of llama.cpp's converter -> general.file_type (gguf.LlamaFileType)
OUTPUT_FILE_TYPES = {"F32": int(gguf.LlamaFileType.ALL_F32), "F16": int(gguf.LlamaFileType.MOSTLY_F16),
                     "BF16": int(gguf.LlamaFileType.MOSTLY_BF16)}


@dataclass
class GGUFPlan:
    """arch: GGUF architecture name; kv: the KV list in file order, where general.file_type holds None
    (it depends on the output type: use kv_for); tensors: in file order."""
    model_dir: Path
    hf_arch: str
    family: str
    arch: str
    kv: list[KVItem]
    tensors: list[TensorSpec]

    @property
    def file_type_index(self) -> int:
        return next(i for i, (k, _, _) in enumerate(self.kv) if k == FILE_TYPE)

    def kv_for(self, file_type: int) -> list[KVItem]:
        """The KV list with general.file_type set (an int of gguf.LlamaFileType)."""
        kv = list(self.kv)
        i = self.file_type_index
        kv[i] = (FILE_TYPE, int(file_type), kv[i][2])
        return kv


def plan(model_dir: Path, model_name: str | None = None, metadata_override: Path | None = None) -> GGUFPlan:
    """The GGUF structure of a local HF checkpoint. model_name / metadata_override: like llama.cpp's
    --model-name / --metadata (general.name otherwise comes from the model card, config or the
    directory's name, as there)."""
    model_dir = Path(model_dir)
    hp = load_hparams(model_dir)
    family = family_for(hp)
    try:
        return _plan(model_dir, hp, family, model_name, metadata_override)
    finally:
        clear_caches()  # the parsed tokenizer.json


def _plan(model_dir: Path, hp, family, model_name, metadata_override) -> GGUFPlan:
    arch = family.gguf_arch
    tensors, early_kv = plan_tensors(model_dir, family, hp)
    kv = KVList()
    kv.string(gguf.Keys.General.ARCHITECTURE, arch)
    for key, value in early_kv.items():
        kv.f32(key, value)
    kv.string(gguf.Keys.General.TYPE, gguf.GGUFType.MODEL)
    kv.extend(general_kv(model_dir, arch, parameter_counts(tensors), model_name,
                         Path(metadata_override) if metadata_override else None))
    family.params(kv, hp, arch)
    kv.u32(gguf.Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION)
    VOCABS[family.vocab](kv, model_dir, hp.d)
    return GGUFPlan(model_dir, hp.hf_arch, family.name, arch, kv.items(), tensors)
