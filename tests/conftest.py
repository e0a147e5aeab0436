"""Shared test set-up: the data committed under tests/data and the top-level input.txt, the real GPT-2 vocab,
no network and nothing outside the repository."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

# must be set before tiktoken / transformers are imported anywhere; subprocesses inherit it (run_env).
# A private copy: tiktoken deletes a cached file whose hash does not match, and caches any local file it is
# given: the tests must never touch the files in tests/data.
_TIKTOKEN_CACHE = tempfile.mkdtemp(prefix="tiktoken_cache_")
shutil.copytree(DATA / "tiktoken_cache", _TIKTOKEN_CACHE, dirs_exist_ok=True)
atexit.register(shutil.rmtree, _TIKTOKEN_CACHE, ignore_errors=True)
os.environ["TIKTOKEN_CACHE_DIR"] = _TIKTOKEN_CACHE
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))


def run_env():
    """Environment for subprocesses (python train_gpt2.py ..., torchrun ...)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="session")
def test_data():
    return DATA


@pytest.fixture(scope="session")
def shakespeare_file():
    """The repository's Tiny Shakespeare (read only: tests that write next to their data use `shakespeare`)."""
    path = ROOT / "input.txt"
    if not path.is_file():
        pytest.fail(f"{path} is missing: it is part of the repository (git checkout input.txt)")
    return path


@pytest.fixture
def shakespeare(tmp_path, shakespeare_file):
    """A private copy of Tiny Shakespeare."""
    dst = tmp_path / "input.txt"
    shutil.copy(shakespeare_file, dst)
    return dst


@pytest.fixture(scope="session")
def hellaswag_sample():
    return DATA / "hellaswag_val_sample.jsonl"


@pytest.fixture(scope="session")
def fineweb_jsonl():
    return DATA / "fineweb_sample_100.jsonl"


@pytest.fixture(scope="session")
def fineweb_parquet():
    return DATA / "fineweb_sample_100.parquet"


@pytest.fixture
def offline_no_tokenizer(tmp_path, monkeypatch):
    """No network (a proxy that refuses every connection) and an empty tiktoken cache, as for a user offline
    before tiktoken ever downloaded the GPT-2 vocab."""
    import tiktoken.registry

    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)  # loaded by earlier tests
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_tiktoken_cache"))
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
