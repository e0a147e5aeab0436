"""Tests of common.py: the launch (the GPU of each rank), the dtype --dtype auto picks and the FLOP counts (the
model's per token, the device's peak). All on CPU."""

import pytest
import torch
import torch.distributed as dist

import common
import train_gpt2 as tg


def test_one_visible_gpu_per_task_is_cuda_0_at_any_local_rank(monkeypatch):
    """srun --gpus-per-task=1 (or CUDA_VISIBLE_DEVICES per rank): each process sees one GPU, ordinal 0, whatever its
    local rank; cuda:{local_rank} was an invalid device ordinal from local rank 1 on."""
    for name in ("TORCHELASTIC_RESTART_COUNT", "LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    chosen = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.setdefault("set_device", str(d)))
    monkeypatch.setattr(dist, "init_process_group", lambda **k: chosen.setdefault("device_id", str(k["device_id"])))
    monkeypatch.setattr(dist, "new_group", lambda **k: None)
    ctx = common.setup_distributed("cuda")
    assert ctx.device == chosen["set_device"] == chosen["device_id"] == "cuda:0"
    assert (ctx.rank, ctx.local_rank, ctx.world_size) == (3, 3, 4)
    # a node's GPUs all visible: the local rank's; fewer visible than local ranks: wrapped around
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert common.cuda_device(3) == "cuda:3"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert common.cuda_device(3) == "cuda:1"


def test_peak_flops_of_h100_nvl_and_mig_slices():
    assert common.gpu_peak_flops("NVIDIA H100 NVL") == 835e12  # not the SXM's 989
    assert common.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    # a MIG slice has N of the GPU's 7 compute slices: its share of the peak, not the whole GPU's
    assert common.gpu_peak_flops("NVIDIA A100-SXM4-40GB MIG 1g.5gb") == 312e12 / 7
    assert common.gpu_peak_flops("NVIDIA H100 80GB HBM3 MIG 3g.40gb") == 989e12 * 3 / 7
    assert common.gpu_peak_flops("NVIDIA H100 NVL MIG 7g.94gb") == 835e12
    assert common.gpu_peak_flops("Some New GPU MIG 1g.10gb") is None


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_dtype_on_gpus_is_bf16_only_with_bf16_tensor_cores(monkeypatch, capability, expected):
    # V100 (7.0) and T4 (7.5) emulate bf16, and torch.cuda.is_bf16_supported() says yes there: it must not decide
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert common.pick_dtype("auto", "cuda") == expected
    assert common.pick_dtype("float32", "cuda") == torch.float32 and common.pick_dtype("bfloat16", "cuda") == torch.bfloat16


def test_flops_and_peak_table():
    assert common.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert common.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert common.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert common.gpu_peak_flops("Some New GPU") is None
    assert common.gpu_peak_flops("NVIDIA GH200 480GB") == 989e12 and common.gpu_peak_flops("NVIDIA H200") == 989e12
    # gpt2 at T=1024: 6 x (50304 x 768 lm_head + 12 layers x 12 x 768^2) + 12 x 12 layers x 768 x 1024 (attention)
    assert common.flops_per_token(tg.GPTConfig(vocab_size=50304), 1024) == 854_654_976
