import json
import os
from pathlib import Path

import pytest
import torch

# Triton picks interpreter or compiler when it is first imported; without a GPU the GPTQ kernel's tests run
# it in the interpreter (production CPU runs never call the kernel)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qconvert import cli
from qconvert.testing.tiny_models import make_tiny_model, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer_dir):
    """tiny(arch, layers=2, **config overrides) -> path of a saved random model (cached per session)."""
    cache: dict = {}

    def make(arch: str = "llama", layers: int = 2, **overrides) -> Path:
        key = (arch, layers, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(arch), arch, layers,
                                         tokenizer_dir=tokenizer_dir, **overrides)
        return cache[key]

    return make


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def qconvert(capsys):
    """Run the command line in-process: qconvert("rtn", path, ...) -> Result(code, stdout, stderr)."""

    def run(*args) -> Result:
        capsys.readouterr()
        code = cli.run([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def oracle():
    """llama.cpp (scripts/build_llama_cpp.sh). CI builds it, so there a missing oracle fails; elsewhere
    the llama.cpp comparisons are skipped with the reason."""
    from qconvert.testing.llama_cpp import OracleUnavailable, locate

    try:
        return locate()
    except OracleUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"llama.cpp oracle missing in CI: {exc}")
        pytest.skip(str(exc))
