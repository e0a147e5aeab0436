"""play.ipynb runs headless (nbclient, a real python3 kernel) on logs written here as train_gpt2.py writes them
(with the run.json it writes beside them): a Tiny Shakespeare run (no baselines), a FineWeb-Edu run (baselines), a
train-only log, overlaid runs, and a missing or empty log; the committed notebook carries no outputs."""
import json

import nbformat
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread
from nbclient import NotebookClient

import metrics
import train_gpt2 as tg
from conftest import ROOT

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


def red_pixels(image):
    """Pixels of the baselines' red (tab:red): the GPT-2 lines and their legend entries, nothing else is red."""
    return int((np.abs(image[..., :3] - to_rgb("tab:red")) < 0.06).all(axis=-1).sum())


def write_run(log_dir, argv, params, steps, lr_norm=False, hella=False):
    """A run's log as train_gpt2.py writes it (train every step, val every 20, optionally lr and norm every step
    and hella every 20) and its run.json, made by train_gpt2.py's own function from these flags."""
    log_dir.mkdir()
    args = tg.parse_args(argv + ["--log_dir", str(log_dir)])
    config = tg.model_config(args.model, args.vocab_size, arch=args.arch)
    metrics.write_run_record(str(log_dir), metrics.run_record(args, config, params))
    lines = []
    for s in range(steps):
        lines.append(f"{s} train {7 * np.exp(-s / 30) + 4:.6f}")
        if lr_norm:
            lr = min(s + 1, 10) * 2e-4 * (1 - s / steps)  # warmup, then a linear decay
            lines += [f"{s} lr {lr:.4e}", f"{s} norm {3 * np.exp(-s / 5) + 0.3:.4f}"]
    lines += [f"{s} val {7 * np.exp(-s / 30) + 4.2:.4f}" for s in range(0, steps + 1, 20)]
    if hella:
        lines += [f"{s} hella {0.25 + 0.0005 * s:.4f}" for s in range(0, steps + 1, 20)]
    return read_streams(write_log(log_dir / "log.txt", lines)), log_dir / "log.txt"


def test_shakespeare_run_is_plotted_without_baselines(tmp_path, monkeypatch, shakespeare_file):
    """A d4 run on Tiny Shakespeare (run.json says so): no GPT-2/GPT-3 line, its own best val loss marked, and the
    lr / gradient norm panel beside the loss."""
    streams, log = write_run(tmp_path / "log_shakespeare", ["--recipe", "fast", "--model", "d4", "--data",
                                                             str(shakespeare_file)], 28_900_000, 80, lr_norm=True)
    text, outputs = execute(tmp_path, monkeypatch, LOG_FILE=log)
    assert f"trained on: {shakespeare_file} (text); model d4 (--arch modern, 4 layers of 256, 28.9M parameters); " \
           "--recipe fast, --init_from scratch" in text, text
    best_val = min(streams["val"].values())
    assert f"min val loss:   {best_val:.4f} at step 80   [no baseline: trained on {shakespeare_file} (text), " \
           "not FineWeb-Edu]" in text, text
    assert "OpenAI GPT-2" not in text and "GPT-3" not in text
    assert f"max grad norm:  {max(streams['norm'].values()):.4f} at step 0" in text
    assert f"peak lr:        {max(streams['lr'].values()):.4g} at step " in text
    image = assert_png(log.with_name("log_plot.png"))
    assert red_pixels(image) == 0, "no baseline drawn"
    height, width, _ = image.shape
    assert 1.6 * height < width < 3 * height, "two panels: loss, lr and norm"
    assert any("image/png" in o.get("data", {}) for o in outputs), "the figure is shown in the notebook too"


def test_fineweb_run_keeps_its_baselines(tmp_path, monkeypatch):
    """A gpt2 (124M) run on fineweb.py's FineWeb-Edu shards (its manifest names the dataset): the GPT-2 val loss and
    the GPT-2/GPT-3 HellaSwag lines are drawn, for the size run.json gives (no MODEL_SIZE)."""
    data = tmp_path / "edu_fineweb10B"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"settings": {"dataset": "HuggingFaceFW/fineweb-edu"}}))
    streams, log = write_run(tmp_path / "log", ["--data", str(data)], 124_475_904, 60, hella=True)
    text, _ = execute(tmp_path, monkeypatch, LOG_FILE=log)
    assert f"min val loss:   {min(streams['val'].values()):.4f} at step 60   [OpenAI GPT-2 124M: 3.2924]" in text, text
    assert "[OpenAI GPT-2 124M: 0.2955, GPT-3 Small 125M: 0.337]" in text
    assert "no baseline" not in text and "grad norm" not in text
    image = assert_png(log.with_name("log_plot.png"))
    assert red_pixels(image) > 500, "the GPT-2 lines are drawn"
    height, width, _ = image.shape
    assert 1.6 * height < width < 3 * height, "two panels: loss and HellaSwag, no lr/norm streams"


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
