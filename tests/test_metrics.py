"""Live metrics of train_gpt2.py (--tensorboard, --wandb): the real packages (wandb offline, no account, no network),
read back with TensorBoard's own event accumulator and a reader of wandb's offline run file, compared with log.txt;
a resumed run continues the same curves. Also the step lines' ETA, the note that a run takes days and what
run.json says --data holds."""
import json
import re
import struct
import sys

import pytest
import torch

import common
import conftest
import metrics
import train_gpt2 as tg

torch.set_num_threads(1)  # as in test_train_gpt2.py: small ops, which a second OpenMP thread slows down

# d2, evaluations and a checkpoint every 2 steps (HellaSwag at 0 and 4)
RUN = dict(model="d2", batch_size=4, seq_len=64, total_batch_size=256, max_steps=4, warmup_steps=2, max_lr=3e-3,
           val_every=2, val_tokens=256, hellaswag_every=4, sample_every=2, checkpoint_every=2, keep_checkpoints=3,
           device="cpu", dtype="float32", compile=0)
METRICS = ["--tensorboard", "--wandb", "test", "--wandb_run", "tiny"]
# log.txt stream: (metric name, how far log.txt rounds it)
FROM_LOG = {"train": ("train/loss", 1e-6), "lr": ("lr/adamw0", 1e-9), "norm": ("train/grad_norm", 1e-6),
            "val": ("val/loss", 1e-4), "hella": ("hellaswag/acc_norm", 1e-4)}


def train_argv(data, log_dir, **flags):
    return [str(a) for k, v in {**RUN, "data": data, "log_dir": log_dir, **flags}.items() for a in (f"--{k}", v)]


def read_log(log_dir):
    return conftest.read_log(log_dir, once=True)


def wandb_reads_the_environment_again():
    """wandb reads its environment once per process (wandb.setup): start over after a test changed it."""
    if sys.modules.get("wandb"):
        sys.modules["wandb"].teardown()


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written outside tmp_path
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    wandb_reads_the_environment_again()


def tensorboard_events(log_dir):
    """{tag: {step: value}} as TensorBoard's server sees the event files (purged steps dropped); and the hparams."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0}).Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step shown twice: {steps}"
        out[tag] = {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in events}
    content = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    return out, {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in hparams.items()}


WANDB_BLOCK = 32768


def wandb_records(path):
    """The Records of a wandb offline run file: a 7-byte ':W&B' header, then a LevelDB log: chunks (crc32c 4 bytes,
    length 2, type 1: full, first, middle, last) in 32 KiB blocks, each a piece of a serialized Record."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pieces = 7, []
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pieces.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # full, or the last piece
            yield Record.FromString(b"".join(pieces))
            pieces = []


def wandb_run(path):
    """(the run record, its config, {step: history row}) of an offline run file."""
    run, config, rows = None, {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in run.config.update})
        elif kind == "history":
            step = record.history.step.num
            assert step not in rows, f"step {step} twice in {path}"
            items = record.history.item
            rows[step] = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
    return run, config, rows


def wandb_runs(log_dir):
    return [wandb_run(p) for p in sorted(log_dir.glob("wandb/offline-run-*/run-*.wandb"))]


def assert_matches_log(log, tb, rows, steps):
    """Each metric log.txt has too, at the given steps, in TensorBoard and wandb: log.txt's value (to its rounding)."""
    for (step, stream), value in log.items():
        if step in steps and stream in FROM_LOG:
            tag, tol = FROM_LOG[stream]
            assert float(tb[tag][step]) == pytest.approx(value, rel=1e-6, abs=tol), (step, tag)
            assert rows[step][tag] == pytest.approx(value, rel=1e-6, abs=tol), (step, tag)


def test_both_log_every_metric_and_a_resumed_run_continues_them(tmp_path, shakespeare, hellaswag_sample, wandb_offline):
    hella8 = tmp_path / "hella8.jsonl"  # 8 examples are enough to log an accuracy
    hella8.write_text("".join(hellaswag_sample.read_text().splitlines(keepends=True)[:8]))
    log_dir = tmp_path / "log"
    argv = train_argv(shakespeare, log_dir, hellaswag_data=hella8) + METRICS
    tg.main(argv)
    log, log_text = read_log(log_dir), (log_dir / "log.txt").read_text()
    tb, hparams = tensorboard_events(log_dir)
    ((run, config, rows),) = wandb_runs(log_dir)
    steps = range(RUN["max_steps"])
    # log.txt: lr and norm every step, beside train
    assert {s for s, stream in log if stream == "lr"} == {s for s, stream in log if stream == "norm"} == set(steps)
    assert_matches_log(log, tb, rows, range(RUN["max_steps"] + 1))
    for s in steps:
        for source in (lambda tag: float(tb[tag][s]), lambda tag: rows[s][tag]):
            assert source("train/tokens") == 256 * (s + 1) and source("train/epoch") == 1
            assert source("perf/tokens_per_s") == pytest.approx(256 / (source("perf/step_time_ms") / 1000), rel=1e-4)
            assert source("lr/adamw1") == source("lr/adamw0")  # biases and gains: on the same schedule
    assert not [tag for tag in tb if tag.startswith(("perf/mfu", "memory/"))]  # GPU only
    assert sorted(tb["val/loss"]) == [0, 2, 4] and sorted(tb["hellaswag/acc_norm"]) == [0, 4]
    for s in (2, 4):  # the samples as text
        assert tb["samples/text_summary"][s].item().decode().count("Hello, I'm a language model,") == 4
        assert rows[s]["samples/_type"] == "table-file" and rows[s]["samples/nrows"] == 4
    # the run's flags and model config
    assert hparams["model.n_layer"] == 2 and hparams["max_lr"] == 3e-3 and hparams["precision"] == "float32"
    assert config["model.n_layer"] == 2 and config["max_lr"] == 3e-3 and config["precision"] == "float32"
    assert run.project == "test" and run.display_name == "tiny"
    assert torch.load(log_dir / "model_00002.pt", weights_only=True)["metrics"]["wandb_id"] == run.run_id

    # preempted after step 4's evaluations were logged, before its checkpoint: resume from step 2
    (log_dir / "model_00004.pt").unlink()
    tg.main(argv + ["--resume"])
    assert (log_dir / "log.txt").read_text() == log_text  # lr and norm lines trimmed and written again, once
    resumed_tb, _ = tensorboard_events(log_dir)  # (no step twice: checked in there)
    first, second = wandb_runs(log_dir)
    assert first[2] == rows and second[0].run_id == run.run_id  # the same wandb run continues
    assert min(second[2]) == 2 and max(second[2]) == 4
    assert_matches_log(log, resumed_tb, second[2], range(2, RUN["max_steps"] + 1))
    assert_matches_log(log, resumed_tb, rows, range(2))
    for tag, values in tb.items():
        if not tag.startswith(("perf/", "_hparams_")):
            assert resumed_tb[tag].keys() == values.keys(), tag
            for s, value in values.items():
                if tag == "samples/text_summary":  # step 2's again from the checkpoint
                    assert resumed_tb[tag][s].item() == value.item()
                    assert second[2][s]["samples/sha256"] == rows[s]["samples/sha256"]
                else:  # step 2's evaluations again from log.txt, to its 4 decimals
                    assert float(resumed_tb[tag][s]) == pytest.approx(float(value), abs=1e-4 if s == 2 else 1e-7)


def test_without_the_flags_nothing_is_imported_and_a_missing_package_is_one_line(tmp_path, shakespeare, monkeypatch,
                                                                                  capsys):
    small = dict(max_steps=1, val_every=0, hellaswag_every=0, sample_every=0, checkpoint_every=0)
    with monkeypatch.context() as m:
        for name in ("wandb", "tensorboard", "torch.utils.tensorboard"):
            m.setitem(sys.modules, name, None)  # an import of any of them would raise ImportError
        tg.main(train_argv(shakespeare, tmp_path / "plain", **small))
        assert read_log(tmp_path / "plain").keys() == {(0, "train"), (0, "lr"), (0, "norm")}
        for flags, package in ((["--tensorboard"], "tensorboard"), (["--wandb", "test"], "wandb")):
            with pytest.raises(SystemExit) as e:
                tg.main(train_argv(shakespeare, tmp_path / package, **small) + flags)
            err = capsys.readouterr().err.strip()
            assert e.value.code == 2 and f"pip install {package}" in err and "\n" not in err, err
            assert not (tmp_path / package).exists()  # refused before any work
    # online without an account: one line before the first step, not a traceback
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb_reads_the_environment_again()
    with pytest.raises(SystemExit) as e:
        tg.main(train_argv(shakespeare, tmp_path / "online", **small) + ["--wandb", "test"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: --wandb test: ") and "\n" not in err, err
    assert "wandb login" in err and "WANDB_MODE=offline" in err
    assert not (tmp_path / "online" / "log.txt").read_text()  # no step


def test_mfu_where_there_is_a_peak_and_the_lr_of_muon_and_adamw(tmp_path, shakespeare):
    """train() sets the GPUs' peak FLOP/s (run.peak_flops) on CUDA only; given one, MFU is the model's FLOPs over
    the peak's."""
    args = tg.parse_args(["--model", "d2", "--seq_len", "64", "--total_batch_size", "256", "--log_dir", str(tmp_path),
                          "--optimizer", "muon", "--muon_lr", "0.02", "--embed_lr", "0.005", "--tensorboard"])
    run = tg.Run(args, common.DistContext(ddp=False, rank=0, local_rank=0, world_size=1, device="cpu"), torch.float32)
    run.model = tg.GPT(tg.model_config("d2"))
    run.optimizer = tg.make_optimizer(run.model, args, "cpu")
    run.train_loader = tg.DataLoaderLite(4, 64, split="train", data_root=str(shakespeare))
    tracker = metrics.Metrics(run)
    tracker.peak_flops = 1e12
    tracker.log_step(0, 10.0, 6e-4, 1.0, 0.5)
    tracker.close()
    tb, _ = tensorboard_events(tmp_path)
    # d2: L=2, C=128, vocab 50304, T=64. N = 50304*128 + 2*12*128^2 = 6,438,912 + 393,216 = 6,832,128;
    # per token 6N + 12*L*C*T = 40,992,768 + 196,608 = 41,189,376 FLOPs; x 256 tokens / 0.5 s / 1e12 = 2.1088960512%
    assert float(tb["perf/mfu_percent"][0]) == pytest.approx(2.1088960512, rel=1e-6)
    lrs = {tag: float(v[0]) for tag, v in tb.items() if tag.startswith("lr/")}  # the groups' peaks (no schedule yet)
    assert lrs == pytest.approx({"lr/adamw0": 0.005, "lr/adamw1": 6e-4, "lr/muon0": 0.02})


def test_step_eta_long_run_note_and_run_record(tmp_path):
    """The step lines' ETA leaves out the first steps; the default recipe on a CPU says at start that it takes
    days (README's quickstart does not); run.json says what --data holds."""
    timer = metrics.StepTimer(skip=2)
    for dt in (30.0, 5.0):  # compilation and warm-up: not counted
        timer.add(dt)
        assert timer.eta(10) == "-"
    for dt in (1.0, 3.0):
        timer.add(dt)
    assert (timer.eta(90), timer.eta(0)) == ("3m00s", "0s")
    assert [metrics.format_duration(s) for s in (45, 725, 12000, 190000)] == ["45s", "12m05s", "3h20m", "2d04h"]
    ctx = common.DistContext(ddp=False, rank=0, local_rank=0, world_size=1, device="cpu")
    seed = tg.Run(tg.parse_args(["--data", "input.txt"]), ctx, precision=torch.float32)
    note = metrics.long_run_note(seed, tg.model_config("gpt2"), 19073)
    assert re.match(r"note: this run will take about \d+d\d\dh: 19073 steps of 524,288 tokens", note), note
    assert "python train_gpt2.py --recipe shakespeare" in note
    quick = tg.Run(tg.parse_args(["--recipe", "shakespeare"]), ctx, precision=torch.float32)
    assert metrics.long_run_note(quick, tg.model_config("d4", arch="modern"), 80) is None
    # --data: a text file, fineweb.py's FineWeb-Edu or --local_files shards, build-nanogpt's shards, others
    for name, manifest, shard, kind in [("edu", "HuggingFaceFW/fineweb-edu", None, "fineweb-edu"),
                                        ("mine", None, None, "local files"),
                                        ("web", "HuggingFaceFW/fineweb", None, "HuggingFaceFW/fineweb"),
                                        ("nanogpt", False, "edufineweb_val_000000.npy", "fineweb-edu"),
                                        ("other", False, "shard_val_000000.npy", "shards")]:
        (tmp_path / name).mkdir()
        if manifest is not False:
            (tmp_path / name / "manifest.json").write_text(json.dumps({"settings": {"dataset": manifest}}))
        if shard:
            (tmp_path / name / shard).touch()
        assert metrics.data_kind(str(tmp_path / name)) == kind, name
    assert metrics.data_kind("input.txt") == "text"
