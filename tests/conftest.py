"""Shared test set-up: offline data from ../shared/data, the real GPT-2 vocab, no hub access."""
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

# must be set before tiktoken / transformers are imported anywhere
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
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
def shared_data():
    if not SHARED.is_dir():
        pytest.fail(f"offline test data not found at {SHARED}")
    return SHARED


@pytest.fixture
def shakespeare(tmp_path, shared_data):
    """A private copy of Tiny Shakespeare (tests never write into ../shared)."""
    dst = tmp_path / "input.txt"
    shutil.copy(shared_data / "tinyshakespeare" / "input.txt", dst)
    return dst


@pytest.fixture(scope="session")
def hellaswag_sample(shared_data):
    return shared_data / "hellaswag" / "hellaswag_val_sample.jsonl"


@pytest.fixture(scope="session")
def fineweb_sample(shared_data):
    return shared_data / "fineweb_sample"
