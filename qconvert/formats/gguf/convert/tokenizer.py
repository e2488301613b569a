"""The tokenizer part of a GGUF file (`tokenizer.*` keys), as llama.cpp's HF converter writes it.

Vocabulary kinds (the GGUF `tokenizer.ggml.model`):
  * "gpt2"  — byte-level BPE from tokenizer.json, read through transformers' AutoTokenizer; the
              pre-tokenizer name is identified by hashing the ids of a probe text (pre_tokenizers.py).
  * "llama" — SentencePiece from tokenizer.model (scores and piece types), or for llama-family
              checkpoints that only ship a byte-fallback BPE tokenizer.json, that tokenizer.json.
Special token ids, add_bos/add_eos/add_sep, merges, chat template and normalizer flags come from
tokenizer.json / tokenizer_config.json / chat_template.* / config.json (`SpecialTokens`), with the
semantics of the gguf-py `SpecialVocab` that ships with llama.cpp 0.3.36 (newer than the PyPI gguf
0.19: the ByteLevel post-processor and post-processor-over-config precedence rules matter).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from hashlib import sha256
from pathlib import Path
from typing import Any

from gguf import Keys, TokenType

from qconvert.errors import QConvertError

from .kv import KVList
from .pre_tokenizers import PRE_TOKENIZERS, PROBE_TEXT

# keys that the installed gguf (0.19 on PyPI) does not define yet
KEY_NORMALIZER_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
KEY_NORMALIZER_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"

# special-token type -> GGUF key; types without a key (cls, prefix, ...) are dropped, as llama.cpp does
ID_KEYS = {"bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID, "unk": Keys.Tokenizer.UNK_ID,
           "sep": Keys.Tokenizer.SEP_ID, "pad": Keys.Tokenizer.PAD_ID, "mask": Keys.Tokenizer.MASK_ID,
           "eot": Keys.Tokenizer.EOT_ID, "eom": Keys.Tokenizer.EOM_ID}
ADD_KEYS = {"bos": Keys.Tokenizer.ADD_BOS, "eos": Keys.Tokenizer.ADD_EOS, "sep": Keys.Tokenizer.ADD_SEP}
DEFAULT_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")

# SentencePiece piece types (= gguf.TokenType values)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (int(TokenType.NORMAL), int(TokenType.UNKNOWN),
                                                       int(TokenType.CONTROL), int(TokenType.USER_DEFINED),
                                                       int(TokenType.UNUSED), int(TokenType.BYTE))
SPACE_MARK = "\u2581"  # SentencePiece's "▁"
SHIFTED_SPACE = chr(ord(" ") + 256)  # "Ġ", how byte-level BPE spells a space


class UnknownPreTokenizer(QConvertError):
    """The BPE tokenizer's pre-tokenizer is not one that llama.cpp knows (its probe-text hash is unknown)."""


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=2)
def _tokenizer_json_cached(path: str, mtime_ns: int, size: int) -> Any:
    return _read_json(Path(path))


def clear_caches() -> None:
    _tokenizer_json_cached.cache_clear()


def _tokenizer_json(model_dir: Path) -> Any:
    """tokenizer.json, parsed once per file version (it is large and read several times); do not mutate."""
    path = Path(model_dir) / "tokenizer.json"
    st = path.stat()
    return _tokenizer_json_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


def _find(hparams: dict, keys: tuple[str, ...]) -> Any:
    return next((hparams[k] for k in keys if k in hparams), None)


# ---------------------------------------------------------------------------------------------------
# pre-tokenizer identification

def probe_hash(token_ids: list[int]) -> str:
    return sha256(str(list(token_ids)).encode()).hexdigest()


def identify_pre_tokenizer(hf_tokenizer) -> str:
    """The `tokenizer.ggml.pre` name of a Hugging Face BPE tokenizer; UnknownPreTokenizer if llama.cpp
    would not recognise it."""
    digest = probe_hash(hf_tokenizer.encode(PROBE_TEXT))
    hit = PRE_TOKENIZERS.get(digest)
    if hit is None:
        raise UnknownPreTokenizer(
            f"this BPE tokenizer's pre-tokenizer is not one llama.cpp knows (probe hash {digest}); llama.cpp's "
            "converter refuses it too. Use a tokenizer of a supported model family or add the hash to "
            "qconvert/formats/gguf/convert/pre_tokenizers.py once llama.cpp supports it")
    return hit[0]


def looks_special(text: str | bytes) -> bool:
    """Added tokens that some models forget to mark special (llama.cpp's heuristic)."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


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
            tok = _tokenizer_json(self.dir)
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
            cfg = _read_json(self.dir / "tokenizer_config.json")
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
            alt = _read_json(js).get("chat_template")
        template = cfg.get("chat_template", alt)
        return template if template is None or isinstance(template, (str, list)) else None

    def _from_config_json(self) -> None:
        path = self.dir / "config.json"
        if not path.is_file():
            return
        config = _read_json(path)
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


# ---------------------------------------------------------------------------------------------------
# vocabularies

def _auto_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def bpe_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    """Byte-level BPE ("gpt2") from tokenizer.json."""
    tok = _auto_tokenizer(model_dir)
    vocab = tok.vocab
    vocab_size = hparams.get("vocab_size", len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise QConvertError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    pre = identify_pre_tokenizer(tok)
    by_id = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        text = by_id[i]
        if text in added:
            if not decoder[i].normalized:  # llama.cpp wants added tokens in their normalized form
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            if decoder[i].special or looks_special(text):
                types.append(CONTROL)
            else:
                text = text.replace(SPACE_MARK, " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(text)
    kv.string(Keys.Tokenizer.MODEL, "gpt2")
    kv.string(Keys.Tokenizer.PRE, pre)
    kv.array(Keys.Tokenizer.LIST, tokens)
    kv.array(Keys.Tokenizer.TOKEN_TYPE, types)
    SpecialTokens(model_dir, load_merges=True).emit(kv)


def _spm_processor(model_dir: Path):
    from sentencepiece import SentencePieceProcessor
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(path)
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    return sp


def _spm_piece_type(sp, i: int) -> int:
    if sp.IsUnknown(i):
        return UNKNOWN
    if sp.IsControl(i):
        return CONTROL
    if sp.IsUnused(i):
        return UNUSED
    if sp.IsByte(i):
        return BYTE
    return NORMAL


def spm_tokens(model_dir: Path, hparams: dict) -> tuple[list[bytes], list[float], list[int]]:
    """SentencePiece pieces + added tokens (added_tokens.json, tokenizer_config added_tokens_decoder),
    padded with [PADi] up to the model's vocab_size."""
    sp = _spm_processor(model_dir)
    vocab_size = _find(hparams, ("vocab_size_per_layer_input", "vocab_size")) or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = _spm_piece_type(sp, i)
    if (model_dir / "added_tokens.json").is_file():
        for text, i in _read_json(model_dir / "added_tokens.json").items():
            if i < vocab_size:
                tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, USER_DEFINED
    if (model_dir / "tokenizer_config.json").is_file():
        decoder = _read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
        for key, data in decoder.items():
            i = int(key)
            if i >= vocab_size:
                continue
            text: str = data["content"]
            if data.get("special") or looks_special(text):
                types[i] = CONTROL
            else:
                text = text.replace(SPACE_MARK, " ")
                types[i] = USER_DEFINED
            scores[i] = -1000.0
            tokens[i] = text.encode("utf-8")
    return tokens, scores, types


def _emit_llama_vocab(kv: KVList, tokens: list, scores: list, types: list) -> None:
    kv.string(Keys.Tokenizer.MODEL, "llama")
    kv.string(Keys.Tokenizer.PRE, "default")
    kv.array(Keys.Tokenizer.LIST, tokens)
    kv.array(Keys.Tokenizer.SCORES, scores)
    kv.array(Keys.Tokenizer.TOKEN_TYPE, types)


def spm_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    tokens, scores, types = spm_tokens(model_dir, hparams)
    _emit_llama_vocab(kv, tokens, scores, types)
    SpecialTokens(model_dir, n_vocab=len(tokens)).emit(kv)


def phi3_spm_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    """Phi-3's own SentencePiece reader: added tokens from tokenizer_config and tokenizer.json, marked
    user-defined or control by their `special` flag only, spaces kept as ▁."""
    sp = _spm_processor(model_dir)
    vocab_size = hparams.get("vocab_size", sp.vocab_size())
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = _spm_piece_type(sp, i)
    if (model_dir / "added_tokens.json").is_file():
        for text, i in _read_json(model_dir / "added_tokens.json").items():
            if i < vocab_size:
                tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, USER_DEFINED
    entries = []
    if (model_dir / "tokenizer_config.json").is_file():
        decoder = _read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
        entries += [(int(k), d) for k, d in decoder.items()]
    if (model_dir / "tokenizer.json").is_file():
        entries += [(int(d["id"]), d) for d in _tokenizer_json(model_dir).get("added_tokens", [])]
    for i, data in entries:
        tokens[i] = data["content"].encode("utf-8")
        scores[i] = -1000.0
        types[i] = CONTROL if data.get("special") else USER_DEFINED
    _emit_llama_vocab(kv, tokens, scores, types)
    SpecialTokens(model_dir, n_vocab=len(tokens)).emit(kv)


def llama_hf_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    """A llama-style (byte-fallback BPE) tokenizer.json without tokenizer.model. Raises
    FileNotFoundError when tokenizer.json is not of that kind, TypeError for Llama-3 style BPE."""
    tj = _tokenizer_json(model_dir)  # FileNotFoundError when absent
    model = tj["model"]
    if model["type"] == "BPE" and model.get("ignore_merges", False) and not model.get("byte_fallback", True):
        raise TypeError("Llama 3 style BPE")
    if model["type"] != "BPE" or not model.get("byte_fallback", False) or tj["decoder"]["type"] != "Sequence":
        raise FileNotFoundError("not a llama BPE tokenizer.json")
    tok = _auto_tokenizer(model_dir)
    base = tok.vocab_size
    added = sorted(tok.get_added_vocab().items(), key=lambda x: x[1])
    added = [(t, i) for t, i in added if i >= base]
    vocab = tok.get_vocab()
    specials = {t: vocab[t] for t in tok.all_special_tokens}
    special_ids = set(tok.all_special_ids)
    by_id = {i: t for t, i in vocab.items()}
    tokens, scores, types = [], [], []
    for i in range(base):
        text = by_id[i].encode("utf-8")
        tokens.append(text)
        scores.append(-1000.0)
        types.append(BYTE if re.fullmatch(rb"<0x[0-9A-Fa-f]{2}>", text) else CONTROL if i in special_ids else NORMAL)
    for text, _ in added:
        tokens.append(text.encode("utf-8"))
        scores.append(-1000.0)
        types.append((CONTROL if specials[text] in special_ids else NORMAL) if text in specials else USER_DEFINED)
    _emit_llama_vocab(kv, tokens, scores, types)
    SpecialTokens(model_dir, n_vocab=len(tokens)).emit(kv)


# ---------------------------------------------------------------------------------------------------
# per-family tokenizer recipes (the set_vocab of each llama.cpp model class)

def llama_family_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = _read_json(cfg_path)
        if (prefix := cfg.get("add_prefix_space")) is not None:
            kv.boolean(Keys.Tokenizer.ADD_PREFIX, prefix)
        if cfg.get("tokenizer_class") == "HybridDNATokenizer":
            raise QConvertError("HybridDNATokenizer vocabularies are not supported")
    if (model_dir / "tekken.json").is_file() and not (model_dir / "tokenizer.json").is_file():
        raise QConvertError("Mistral tekken.json tokenizers are not supported (needs mistral-common)")
    try:
        spm_vocab(kv, model_dir, hparams)
    except FileNotFoundError:
        try:
            llama_hf_vocab(kv, model_dir, hparams)
        except (FileNotFoundError, TypeError):
            bpe_vocab(kv, model_dir, hparams)
    vocab_size = hparams.get("vocab_size", 32000)
    if vocab_size == 32016:  # CodeLlama: only the EOT id has a GGUF key among its FIM tokens
        extra = SpecialTokens(model_dir, types=("prefix", "suffix", "middle", "eot"))
        for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
            extra.set_id(typ, tid)
        extra.emit(kv)
    if vocab_size == 49152:  # llama.cpp's rule for granite-small vocabularies (also hits SmolLM/SmolLM2)
        kv.boolean(Keys.Tokenizer.ADD_BOS, False)


def spm_or_bpe_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    try:
        spm_vocab(kv, model_dir, hparams)
    except FileNotFoundError:
        bpe_vocab(kv, model_dir, hparams)


def gemma3_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    if (model_dir / "tokenizer.model").is_file():
        spm_vocab(kv, model_dir, hparams)
        kv.boolean(Keys.Tokenizer.ADD_PREFIX, False)
    else:
        bpe_vocab(kv, model_dir, hparams)


def gemma2_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    try:
        spm_vocab(kv, model_dir, hparams)
    except FileNotFoundError:
        raise QConvertError(f"Gemma 2 needs a SentencePiece tokenizer.model in {model_dir}") from None
    kv.boolean(Keys.Tokenizer.ADD_PREFIX, False)


def phi3_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = _read_json(cfg_path)
        if "tokenizer_class" not in cfg:
            raise QConvertError(f"{cfg_path} has no tokenizer_class (llama.cpp's converter needs it for Phi-3)")
        if cfg["tokenizer_class"] == "GPT2Tokenizer":  # Phi-4
            bpe_vocab(kv, model_dir, hparams)
            return
    if not (model_dir / "tokenizer.model").is_file():
        raise QConvertError(f"Phi-3 needs a SentencePiece tokenizer.model in {model_dir}")
    phi3_spm_vocab(kv, model_dir, hparams)


VOCABS = {
    "llama": llama_family_vocab,
    "spm_or_bpe": spm_or_bpe_vocab,
    "bpe": bpe_vocab,
    "gemma3": gemma3_vocab,
    "gemma2": gemma2_vocab,
    "phi3": phi3_vocab,
}


def vocab_rows(model_dir: Path, hparams: dict) -> int:
    """Gemma 3's count of real vocabulary rows (token_embd is cut to it)."""
    if (model_dir / "tokenizer.model").is_file():
        return len(spm_tokens(model_dir, hparams)[0])
    tj = _tokenizer_json(model_dir)
    return len(tj["model"]["vocab"]) + len(tj["added_tokens"])
