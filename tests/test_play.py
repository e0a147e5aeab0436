"""play.ipynb runs headless (nbclient, a real python3 kernel) on a real CPU training log, on a train-only log,
on overlaid runs, and on a missing or empty log; the committed notebook carries no outputs."""
import subprocess
import sys

import nbformat
import numpy as np
import pytest
from matplotlib.image import imread
from nbclient import NotebookClient

from conftest import ROOT, run_env

NOTEBOOK = ROOT / "play.ipynb"
PARAMS = ("LOG_FILE", "MODEL_SIZE", "SMOOTH", "PLOT_FILE", "LOSS_YMAX")


def execute(tmp_path, monkeypatch, **params):
    """Run the notebook headless with these environment parameters; return its printed text and cells.
    nbclient raises CellExecutionError if any cell fails, so returning at all means no cell errored."""
    for name in PARAMS:  # the kernel inherits this process's environment: only the test's own parameters
        monkeypatch.delenv(name, raising=False)
    for name, value in params.items():
        monkeypatch.setenv(name, str(value))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.text for o in outputs if o.output_type == "stream")
    assert "Traceback" not in text and "Error" not in text, text
    return text, outputs


def read_streams(path):
    """The test's own reading of a log: {stream: {step: value}}, later lines win."""
    streams = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            streams.setdefault(parts[1], {})[int(parts[0])] = float(parts[2])
    return streams


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 0, f"no plot at {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)  # (H, W, channels)


def write_log(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown", "the walk-through comes first"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "LOG_FILE" in code[0].source and "MODEL_SIZE" in code[0].source, "the first code cell holds the parameters"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "clear the notebook's outputs before committing"


def test_real_cpu_run(tmp_path, monkeypatch, shakespeare):
    """A real (tiny) CPU training run writes train and val lines, no hella: the loss panel alone."""
    log_dir = tmp_path / "cpu_run"
    cmd = [sys.executable, str(ROOT / "train_gpt2.py"), "--data", str(shakespeare), "--model", "d2",
           "--batch_size", "4", "--seq_len", "64", "--total_batch_size", "256", "--max_steps", "20",
           "--warmup_steps", "3", "--val_every", "10", "--val_tokens", "512", "--hellaswag_every", "0",
           "--sample_every", "0", "--checkpoint_every", "0", "--log_dir", str(log_dir),
           "--device", "cpu", "--dtype", "float32", "--compile", "0"]
    run = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    log = log_dir / "log.txt"
    streams = read_streams(log)
    assert "train" in streams and "val" in streams and "hella" not in streams, sorted(streams)

    text, outputs = execute(tmp_path, monkeypatch, LOG_FILE=log, MODEL_SIZE="124M")
    assert f"min train loss: {min(streams['train'].values()):.4f}" in text, text
    assert f"min val loss:   {min(streams['val'].values()):.4f}" in text, text
    assert "OpenAI GPT-2 124M: 3.2924" in text
    assert "no hella lines" in text
    height, width, _ = assert_png(log_dir / "log_plot.png").shape
    assert width < 1.6 * height, "one panel (loss) only: a CPU run has no HellaSwag"
    assert any("image/png" in o.get("data", {}) for o in outputs), "the figure is shown in the notebook too"


def test_train_only_log(tmp_path, monkeypatch):
    """Only train lines (e.g. a run stopped before its first eval): it plots what it has."""
    losses = [10.9, 9.7, 8.8, 8.1, 7.6, 7.7, 7.2]
    log = write_log(tmp_path / "early" / "log.txt", [f"{s} train {v:.6f}" for s, v in enumerate(losses)])
    text, _ = execute(tmp_path, monkeypatch, LOG_FILE=log, MODEL_SIZE="774M")
    assert "min train loss: 7.2000 at step 6" in text, text
    assert "no val lines" in text and "no hella lines" in text
    assert "OpenAI GPT-2 774M: not measured" in text  # no GPT-2 val loss for 774M: said, not drawn
    height, width, _ = assert_png(tmp_path / "early" / "log_plot.png").shape
    assert width < 1.6 * height


def test_overlaid_runs_with_hellaswag_and_resumed_steps(tmp_path, monkeypatch):
    """Two runs overlaid. The first was resumed without trimming its log (steps 20..29 logged twice: the
    later values count), has HellaSwag evals, and ends in a half-written line as a live run's log does."""
    rng = np.random.default_rng(0)
    first = []
    for step in range(30):
        first.append(f"{step} train {1.0 if step >= 20 else 4 + 3 * np.exp(-step / 5) + rng.normal(0, 0.05):.6f}")
    for step in range(20, 40):  # the resumed run logs 20..29 again: these replace the 1.0s above
        first.append(f"{step} train {3.5 - 0.01 * step + rng.normal(0, 0.05):.6f}")
    first += [f"{s} val {5.0 - 0.02 * s:.4f}" for s in range(0, 40, 10)]
    first += [f"{s} hella {0.25 + 0.002 * s:.4f}" for s in range(0, 40, 10)]
    first += ["", "39 tra"]
    log_a = write_log(tmp_path / "run_a" / "log.txt", first)
    log_b = write_log(tmp_path / "run_b" / "log.txt", [f"{s} train {9.0 - 0.1 * s:.6f}" for s in range(25)]
                      + [f"{s} val {9.1 - 0.1 * s:.4f}" for s in range(0, 25, 8)] + ["12 epoch 2"])
    a, b = read_streams(log_a), read_streams(log_b)
    assert min(a["train"].values()) > 1.0  # the resumed values replaced the stale ones

    text, outputs = execute(tmp_path, monkeypatch, LOG_FILE=f"{log_a},{log_b}", MODEL_SIZE="350M")
    assert "skipped 1 line" in text  # the half-written last line, not the blank one
    assert "== run_a" in text and "== run_b" in text
    run_a, run_b = text.split("== run_b")
    assert f"min train loss: {min(a['train'].values()):.4f}" in run_a, text
    assert f"min val loss:   {min(a['val'].values()):.4f}" in run_a
    assert f"max HellaSwag:  {max(a['hella'].values()):.4f}" in run_a
    assert "OpenAI GPT-2 350M: 0.3752" in run_a and "GPT-3 Medium 350M: 0.436" in run_a
    assert f"min train loss: {min(b['train'].values()):.4f}" in run_b
    assert "no hella lines" in run_b
    assert "2 epochs (new at steps 12)" in run_b and "epochs" not in run_a  # the run's `STEP epoch N` lines
    height, width, _ = assert_png(tmp_path / "run_a" / "log_compare_plot.png").shape
    assert width > 2 * height, "two panels: loss and HellaSwag"


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_or_empty_log_gives_one_message(tmp_path, monkeypatch, case):
    log = tmp_path / "log" / "log.txt"
    if case == "empty":
        write_log(log, [])
    text, outputs = execute(tmp_path, monkeypatch, LOG_FILE=log)
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert str(log) in lines[0] and "LOG_FILE" in lines[0], text
    assert lines[0].startswith("No log at" if case == "missing" else str(log))
    assert not list(tmp_path.rglob("*.png")), "nothing to plot, nothing saved"
    assert not any("image/png" in o.get("data", {}) for o in outputs)
