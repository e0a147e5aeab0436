"""Paths of train_gpt2.py that only run on a CUDA GPU (skipped without one)."""
import pytest
import torch

import train_gpt2 as tg
from test_metrics import tensorboard_events, train_argv

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_metrics_on_a_gpu_log_peak_memory_and_mfu(tmp_path, shakespeare):
    small = dict(max_steps=2, val_every=0, hellaswag_every=0, sample_every=0, checkpoint_every=0, optimizer="adamw",
                 device="cuda", dtype="bfloat16")
    tg.main(train_argv(shakespeare, tmp_path / "log", **small) + ["--tensorboard"])
    tb, _ = tensorboard_events(tmp_path / "log")
    assert sorted(tb["memory/peak_gib"]) == [0, 1] and all(0 < float(v) < 200 for v in tb["memory/peak_gib"].values())
    if tg.gpu_peak_flops(torch.cuda.get_device_name()) is not None:  # a GPU of the peak table
        assert all(0 < float(v) < 100 for v in tb["perf/mfu_percent"].values())
    else:
        assert "perf/mfu_percent" not in tb
