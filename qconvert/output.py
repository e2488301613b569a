"""Output directories: written in a staging folder beside OUT and renamed into place when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qconvert import __version__
from qconvert.errors import QConvertError

# files a consumer needs beside the weights (tokenizers in their several forms, chat template)
AUX_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def check_output(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse an existing OUT (unless overwrite) and any OUT that would touch the input checkpoint."""
    out = out.resolve()
    if source is not None:
        src = source.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise QConvertError(f"{out}: the output must not be inside, equal to, or contain the input {src}")
    if out.exists() and not overwrite:
        raise QConvertError(f"{out}: already exists (pass --overwrite to replace it)")


def _new_stage(out: Path, overwrite: bool, source: Path | None) -> tuple[Path, Path]:
    check_output(out, overwrite, source)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool, source: Path | None = None) -> Iterator[Path]:
    """Yield a staging folder next to `out`; on success it replaces `out`, on failure it is removed."""
    out, stage = _new_stage(out, overwrite, source)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _publish_permissions(stage)
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        out.rename(trash / out.name)
        stage.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        stage.rename(out)


@contextlib.contextmanager
def staged_file(out: Path, overwrite: bool, source: Path | None = None) -> Iterator[Path]:
    """Like staged_output for a single file: yields its path inside a staging folder beside `out`."""
    out, stage = _new_stage(out, overwrite, source)
    try:
        yield stage / out.name
        _publish_permissions(stage)
        os.replace(stage / out.name, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_json_atomically(path: Path, data: dict) -> None:
    """Replace `path` with `data` as JSON; a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _publish_permissions(stage: Path) -> None:
    """mkdtemp and safetensors create private (0700/0600) entries; give them the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)
    for f in stage.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def copy_aux_files(source: Path, dest: Path) -> None:
    for name in AUX_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)


def write_config(source_config: dict, dest: Path, quantization_config: dict | None) -> None:
    config = dict(source_config)
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_model_card(dest: Path, title: str, source: str, facts: dict[str, object], command: str) -> None:
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    text = f"""---
tags: [quantized, qconvert]
base_model: {source}
---

# {title}

Quantized from `{source}` by qconvert {__version__}.

| | |
|---|---|
{rows}

Produced with:

```
{command}
```
"""
    (dest / "README.md").write_text(text)
