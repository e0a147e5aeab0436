"""Shared test set-up: the data committed under tests/data and the top-level input.txt, the real GPT-2 vocab,
no network and nothing outside the repository."""
import atexit
import contextlib
import io
import os
import shutil
import subprocess
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


# -----------------------------------------------------------------------------
# Shared helpers: import them (from conftest import ...). The CPU suite runs train_gpt2.py on the CPU even where a
# GPU is present: its references (losses, samples, log lines) are CPU numbers, and --device auto would pick CUDA.


def flag_argv(flags):
    """{"model": "d2", "max_steps": 4, "resume": True} -> ["--model", "d2", "--max_steps", "4", "--resume"]."""
    return [str(a) for k, v in flags.items() for a in ((f"--{k}",) if v is True else (f"--{k}", v))]


def on_cpu(argv):
    """train_gpt2.py's argv as strings, with --device cpu unless it names a device."""
    argv = [str(a) for a in argv]
    return argv if "--device" in argv else argv + ["--device", "cpu"]


def train_here(argv):
    """train_gpt2.main(argv) in this process (no interpreter start-up), on the CPU unless argv names a device: its
    stdout. On one thread, as the subprocesses (OMP_NUM_THREADS=1), so that its losses equal theirs to the last bit."""
    import torch
    import train_gpt2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            train_gpt2.main(on_cpu(argv))
    finally:
        torch.set_num_threads(threads)
    return out.getvalue()


def main_error(argv, capsys, code=2):
    """train_gpt2.main(argv) in this process: exit code `code` and its one stderr line (transformers' progress bar,
    shown when it loaded weights, left out)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_here(argv)
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if "it/s]" not in line)
    assert e.value.code == code and err.count("\n") == 0 and err.startswith("error: "), err
    return err


def run_cli(args, cwd, check=True, timeout=300, **kw):
    """python train_gpt2.py args in a new process, on the CPU unless args name a device."""
    cmd = [sys.executable, str(ROOT / "train_gpt2.py"), *on_cpu(args)]
    p = subprocess.run(cmd, cwd=cwd, env=run_env(), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def assert_one_line_error(p, *needles):
    """A finished process (subprocess.run) failed with exit code 2 and one 'error: ' line naming each needle."""
    err = p.stderr.strip()
    assert p.returncode == 2 and "Traceback" not in err and err.count("\n") == 0 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


def read_log(log_dir, once=False):
    """{(step, stream): value} of a run's log.txt; once: a (step, stream) logged twice fails."""
    out = {}
    with open(os.path.join(log_dir, "log.txt")) as f:
        for line in f:
            step, stream, value = line.split()
            assert not (once and (int(step), stream) in out), f"{line.strip()}: logged twice"
            out[(int(step), stream)] = float(value)
    return out


def train_losses(log_dir):
    """{step: train loss} of a run's log.txt."""
    return {step: value for (step, stream), value in read_log(log_dir).items() if stream == "train"}


# train_gpt2.py's argv after --data and --log_dir: one step of d2 on the CPU, for the inputs refused before any work
TRAIN = [
    "--model",
    "d2",
    "--batch_size",
    2,
    "--seq_len",
    16,
    "--total_batch_size",
    32,
    "--device",
    "cpu",
    "--compile",
    0,
    "--max_steps",
    1,
    "--val_every",
    0,
    "--hellaswag_every",
    0,
    "--sample_every",
    0,
]
