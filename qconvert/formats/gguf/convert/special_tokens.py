"""Special tokens, merges, add_bos/add_eos/add_sep, normalizer flags and the chat template of a GGUF
file, with the semantics of the gguf-py `SpecialVocab` that ships with llama.cpp 0.3.36 (newer than
the PyPI gguf 0.19: the ByteLevel post-processor and post-processor-over-config precedence rules
matter); plus the cached reading of the tokenizer files they come from."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from gguf import Keys

from qconvert.errors import QConvertError

from .kv import KVList

SHIFTED_SPACE = chr(ord(" ") + 256)  # "Ġ", how byte-level BPE spells a space

# keys that the installed gguf (0.19 on PyPI) does not define yet
KEY_NORMALIZER_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
KEY_NORMALIZER_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"

# special-token type -> GGUF key; types without a key (cls, prefix, ...) are dropped, as llama.cpp does
ID_KEYS = {"bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID, "unk": Keys.Tokenizer.UNK_ID,
           "sep": Keys.Tokenizer.SEP_ID, "pad": Keys.Tokenizer.PAD_ID, "mask": Keys.Tokenizer.MASK_ID,
           "eot": Keys.Tokenizer.EOT_ID, "eom": Keys.Tokenizer.EOM_ID}
ADD_KEYS = {"bos": Keys.Tokenizer.ADD_BOS, "eos": Keys.Tokenizer.ADD_EOS, "sep": Keys.Tokenizer.ADD_SEP}
DEFAULT_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")

def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=2)
def _tokenizer_json_cached(path: str, mtime_ns: int, size: int) -> Any:
    return read_json(Path(path))


def clear_caches() -> None:
    _tokenizer_json_cached.cache_clear()


def tokenizer_json(model_dir: Path) -> Any:
    """tokenizer.json, parsed once per file version (it is large and read several times); do not mutate."""
    path = Path(model_dir) / "tokenizer.json"
    st = path.stat()
    return _tokenizer_json_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


# ---------------------------------------------------------------------------------------------------
# special tokens, merges, chat template (gguf-py SpecialVocab semantics)

class SpecialTokens:
    def __init__(self, model_dir: Path, load_merges: bool = False, types: tuple[str, ...] | None = None,
                 n_vocab: int | None = None):
        self.dir = Path(model_dir)
        self.load_merges = load_merges
        self.types = tuple(types) if types is not None else DEFAULT_SPECIAL_TYPES
        self.n_vocab = n_vocab
        self.merges: list[str] = []
        self.ids: dict[str, int] = {}
        self.add: dict[str, bool] = {}
        self.chat_template: str | list | None = None
        self.lowercase: bool | None = None
        self.strip_accents: bool | None = None
        self._from_tokenizer_files()
        self._from_config_json()
        if self.load_merges and not self.merges:
            self._from_merges_txt()

    def set_id(self, typ: str, tid: Any) -> None:
        if not isinstance(tid, int):
            return
        if tid < 0:
            raise QConvertError(f"invalid id for special token {typ}: {tid}")
        if (self.n_vocab is None or tid < self.n_vocab) and typ not in self.ids:
            self.ids[typ] = tid

    def emit(self, kv: KVList) -> None:
        if self.merges:
            kv.array(Keys.Tokenizer.MERGES, self.merges)
        for typ, tid in self.ids.items():
            if typ in ID_KEYS:
                kv.u32(ID_KEYS[typ], tid)
        for typ, value in self.add.items():
            if typ in ADD_KEYS:
                kv.boolean(ADD_KEYS[typ], value)
        if self.chat_template is not None:
            emit_chat_template(kv, self.chat_template)
        if self.lowercase is not None:
            kv.boolean(KEY_NORMALIZER_LOWERCASE, self.lowercase)
        if self.strip_accents is not None:
            kv.boolean(KEY_NORMALIZER_STRIP_ACCENTS, self.strip_accents)

    # -- sources --

    def _from_merges_txt(self) -> None:
        path = self.dir / "merges.txt"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].strip().startswith("#"):
            lines = lines[1:]
        merges = []
        for line in lines:
            parts = line.strip().split(None, 3)
            if len(parts) == 2:
                merges.append(f"{parts[0]} {parts[1]}")
        self.merges = merges

    def _normalizer(self, norm: dict) -> None:
        kind = norm.get("type")
        if kind == "Lowercase":
            self.lowercase = True
        elif kind == "StripAccents":
            self.strip_accents = True
        elif kind == "BertNormalizer":
            if "lowercase" in norm:
                self.lowercase = norm["lowercase"]
            if "strip_accents" in norm:
                self.strip_accents = norm["strip_accents"]
        elif kind == "Sequence":
            for sub in norm.get("normalizers", []):
                self._normalizer(sub)

    def _from_tokenizer_files(self) -> None:
        tok = None
        added: list = []
        if (self.dir / "tokenizer.json").is_file():
            tok = tokenizer_json(self.dir)
            if self.load_merges:
                merges = tok.get("model", {}).get("merges")
                if isinstance(merges, list) and merges:
                    if isinstance(merges[0], str):
                        self.merges = merges
                    elif isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
                        # pair format: spaces inside a part are shifted to U+0120 like byte-level BPE does
                        self.merges = [f"{a.replace(' ', SHIFTED_SPACE)} {b.replace(' ', SHIFTED_SPACE)}"
                                       for a, b in merges]
                    else:
                        raise QConvertError("unknown tokenizer.json merges format")
            if norm := tok.get("normalizer"):
                self._normalizer(norm)
            added = tok.get("added_tokens", {})
        cfg = None
        if (self.dir / "tokenizer_config.json").is_file():
            cfg = read_json(self.dir / "tokenizer_config.json")
        if tok:
            self._post_processor(tok, cfg)
        if not cfg:
            return
        self.chat_template = self._chat_template(cfg)
        for typ in self.types:
            add_entry = cfg.get(f"add_{typ}_token")
            if isinstance(add_entry, bool) and typ not in self.add:
                self.add[typ] = add_entry  # the post-processor, when it says something, wins
            entry = cfg.get(f"{typ}_token")
            if isinstance(entry, dict):
                entry = entry.get("content")
            if not isinstance(entry, str):
                continue
            self.set_id(typ, next((a.get("id") for a in added if a.get("content") == entry), None))

    def _post_processor(self, tok: dict, cfg: dict | None) -> None:
        """What the tokenizer.json post-processor says about adding BOS/EOS/SEP (may edit cfg)."""
        post = tok.get("post_processor")
        if not post:
            return
        c = cfg or {}
        bos, cls, eos, sep = c.get("bos_token"), c.get("cls_token"), c.get("eos_token"), c.get("sep_token")
        if not bos and cls and cfg:
            cfg["bos_token"] = bos = cls
        if not eos and sep and cfg:
            cfg["eos_token"] = eos = sep
        for proc in post.get("processors", [post]):
            kind = proc.get("type")
            if kind == "ByteLevel":
                self.add.setdefault("bos", False)
                self.add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                self.add.update(bos=True, eos=True, sep=True)
                if not cls and cfg:
                    cfg["cls_token"] = cls = proc.get("cls", [bos])[0]
                if not sep and cfg:
                    cfg["sep_token"] = sep = proc.get("sep", [eos])[0]
            elif kind == "TemplateProcessing":
                single, pair = proc.get("single", []), proc.get("pair", [])
                first = last = None
                if len(single) > 1:
                    if first := single[0].get("SpecialToken", {}).get("id"):
                        if not cfg:
                            bos = first
                        elif first not in (bos, cls):
                            if not bos:
                                cfg["bos_token"] = bos = first
                            if not cls:
                                cfg["cls_token"] = cls = first
                        self.add["bos"] = first in (bos, cls)
                    if last := single[-1].get("SpecialToken", {}).get("id"):
                        if not cfg:
                            eos = last
                        elif last != eos:
                            if "eot" not in self.types:
                                self.types = self.types + ("eot",)
                                cfg["eot_token"] = eos
                            elif "eom" not in self.types:
                                self.types = self.types + ("eom",)
                                cfg["eom_token"] = eos
                            cfg["eos_token"] = eos = last
                        self.add["eos"] = last == eos
                if pair:
                    start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
                    stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
                    inner = pair[slice(start, stop)]
                    if inner:
                        a = inner[0].get("Sequence", {}).get("id")
                        b = inner[-1].get("Sequence", {}).get("id")
                        if a == "A" and b == "B" and (middle := inner[1:-1]):
                            add_sep = False
                            entry = middle[0].get("SpecialToken", {}).get("id")
                            if entry and entry in (sep, eos) and not last:
                                add_sep = True
                            if len(middle) == 2:
                                entry = middle[1].get("SpecialToken", {}).get("id")
                                if entry and entry in (sep, eos):
                                    add_sep = True
                            self.add["sep"] = add_sep
                            if add_sep and not sep and cfg:
                                cfg["sep_token"] = eos

    def _chat_template(self, cfg: dict) -> str | list | None:
        alt = None
        jinja, js = self.dir / "chat_template.jinja", self.dir / "chat_template.json"
        if jinja.is_file():
            alt = jinja.read_text(encoding="utf-8")
            extra = sorted((self.dir / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}] + [
                    {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif js.is_file():
            alt = read_json(js).get("chat_template")
        template = cfg.get("chat_template", alt)
        return template if template is None or isinstance(template, (str, list)) else None

    def _from_config_json(self) -> None:
        path = self.dir / "config.json"
        if not path.is_file():
            return
        config = read_json(path)
        for typ in self.types:
            tid = config.get(f"{typ}_token_id")
            if tid is None and "text_config" in config:
                tid = config["text_config"].get(f"{typ}_token_id")
            self.set_id(typ, tid)


def emit_chat_template(kv: KVList, template: str | list) -> None:
    if isinstance(template, str):
        kv.string(Keys.Tokenizer.CHAT_TEMPLATE, template)
        return
    default, names = None, []
    for choice in template:
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in choice.get("name", ""))
        body = choice.get("template")
        if name and body is not None:
            if name == "default":
                default = body
            else:
                # llama.cpp collects these names in a set, so its order is not reproducible
                if name not in names:
                    names.append(name)
                kv.string(Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name), body)
    if names:
        kv.array(Keys.Tokenizer.CHAT_TEMPLATES, names)
    if default is not None:
        kv.string(Keys.Tokenizer.CHAT_TEMPLATE, default)
