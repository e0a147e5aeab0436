"""GPU self-check: the CUDA paths the CPU suite cannot run, each with an assertion, on tiny models.

    python -m pytest -q tests/test_gpu.py       # a few minutes on one GPU; with 2+ GPUs also NCCL DDP and FSDP

Without CUDA these tests skip ("needs CUDA"), and those that need two GPUs skip on one. The CPU tests at the end
cover the GPU paths' logic where PyTorch allows it on a CPU (faked memory queries, inductor's partitioner, gloo).
"""
import argparse
import math
import re
import shutil
import subprocess
import sys
import weakref

import pytest
import torch

import checkpoints
import common
import hellaswag
import sharding
import train_gpt2 as tg
from conftest import ROOT, run_env, train_losses
from test_metrics import tensorboard_events

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
needs_2_gpus = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """train() switches TF32 on for the whole process: tests comparing float32 results need it off again."""
    yield
    if HAS_CUDA:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def tiny_model(arch="gpt2", device="cuda", block_size=128):
    """d2 (2 layers, width 128), every weight moved off its init: the modern head starts at zero, which would
    make every logit equal and every comparison trivial."""
    torch.manual_seed(0)
    model = tg.GPT(tg.model_config("d2", block_size=block_size, arch=arch))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.to(device)


def tokens(B, T, device="cuda", seed=0):
    return torch.randint(0, tg.GPT2_VOCAB, (B, T), generator=torch.Generator().manual_seed(seed)).to(device)


def loss_and_grads(model, params, x, dtype):
    """The loss (float) and all gradients (one flat float32 vector) of a forward+backward under autocast dtype."""
    for p in params:
        p.grad = None
    with common.autocast_context("cuda", dtype):
        _, loss = model(x, x)
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten() for p in params])


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def run_args(log_dir, **overrides):
    """A d2 model on Tiny Shakespeare, on the GPU."""
    flags = dict(
        data=ROOT / "input.txt", model="d2", batch_size=4, seq_len=64, total_batch_size=1024, max_steps=4,
        warmup_steps=2, max_lr=3e-3, val_every=0, hellaswag_every=0, sample_every=0, checkpoint_every=0,
        log_dir=log_dir, device="cuda", dtype="float32", compile=0,
    )
    flags.update(overrides)
    return [str(a) for k, v in flags.items() for a in (f"--{k}", v)]


def run_main(argv, capsys):
    tg.main(argv)
    return capsys.readouterr().out


def launch(argv, cwd, nproc=None, env=None, timeout=600):
    """train_gpt2.py in a new process (under torchrun with nproc); its output, after checking it succeeded."""
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    cmd = [sys.executable, *runner, str(ROOT / "train_gpt2.py"), *argv]
    p = subprocess.run(cmd, cwd=cwd, env=env or run_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def assert_losses_close(a, b, tol):
    assert a.keys() == b.keys() and a
    for step in a:
        assert abs(a[step] - b[step]) < tol, (step, a[step], b[step])


# -----------------------------------------------------------------------------
# precision and compile


@needs_cuda
@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_bf16_compiled_full_logits_equal_eager_losses_and_gradients(arch):
    model = tiny_model(arch)
    model.loss_chunk_size = 0  # full logits and F.cross_entropy: the path torch.compile fuses
    params = list(model.parameters())
    x = tokens(4, 128)
    eager_loss, eager_grads = loss_and_grads(model, params, x, torch.bfloat16)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model), params, x, torch.bfloat16)
    assert compiled_loss == pytest.approx(eager_loss, abs=2e-2)
    assert rel_err(compiled_grads, eager_grads) < 5e-2


@needs_cuda
@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_fp16_scaled_chunked_loss_gradients_equal_float32(arch):
    """GradScaler's scale reaches the chunked loss's gradient before it is cast to fp16: unscaled, most of
    (softmax - one_hot) / tokens is below fp16's smallest number and the lm_head gradient is mostly lost."""
    model = tiny_model(arch)
    params = list(model.parameters())
    x = tokens(4, 128)
    unseen = torch.ones(model.config.vocab_size, dtype=torch.bool, device=x.device)
    unseen[x.flatten()] = False  # lm_head rows of ids not in x: their gradient is the small softmax terms only
    model.loss_chunk_size = 0
    _, reference = loss_and_grads(model, params, x, torch.float32)
    reference_unseen = model.lm_head.weight.grad[unseen].float()
    model.loss_chunk_size = 128
    for p in params:
        p.grad = None
    scale = 2.0**16
    with torch.autocast("cuda", dtype=torch.float16):
        _, loss = model(x, x)
    (loss * scale).backward()
    grads = torch.cat([p.grad.float().flatten() for p in params]) / scale
    assert rel_err(grads, reference) < 3e-2
    # the rows the scale is for: measured with CPU fp16 autocast, 0.04% off scaled and 25% (gpt2) or 48% (modern)
    # off unscaled, while all the gradients together were 1% off either way: 5% bounds fp16 rounding, not the loss
    assert rel_err(model.lm_head.weight.grad[unseen].float() / scale, reference_unseen) < 5e-2


def probe_peak(model, params, x, dtype):
    """Peak GPU bytes of a forward+backward above what was allocated before it."""
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with common.autocast_context("cuda", dtype):
        _, loss = model(x, x)
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_chunked_loss_peak_memory_is_at_most_the_eager_probes(dtype):
    """--batch_size auto probes uncompiled; the compiled step must not need more. Inductor may merge the fp16 loss's
    recomputed logits with the forward's and keep every chunk's logits (B*T*vocab*2 bytes) for backward."""
    model = tiny_model(block_size=256)  # x's 256 positions: a d2 of block_size 128 would refuse them
    model.loss_chunk_size = 256  # 8 chunks of 256 x 50304 logits
    params = list(model.parameters())
    x = tokens(8, 256)
    assert x.size(1) <= model.config.block_size
    compiled = torch.compile(model)
    probe_peak(model, params, x, dtype)  # warm-up: cuBLAS workspaces, autotuning
    probe_peak(compiled, params, x, dtype)  # compiles
    eager, after_compile = probe_peak(model, params, x, dtype), probe_peak(compiled, params, x, dtype)
    all_logits = x.numel() * model.config.vocab_size * 2
    assert after_compile <= eager + all_logits // 8, (after_compile, eager)


@needs_cuda
def test_fp16_grad_scaler_skips_an_overflowing_step_and_lowers_the_scale():
    model = tiny_model()
    args = argparse.Namespace(grad_clip=1.0, total_batch_size=4 * 64, seq_len=64)
    run = tg.Run(args, common.DistContext(False, 0, 0, 1, "cuda"), torch.float16, batch_size=4, train_model=model, optimizer=tg.configure_optimizers(model, 0.1, 1e-3, "cuda"),
                 scaler=torch.amp.GradScaler("cuda", init_scale=2.0**40),  # loss x 2^40 overflows fp16's 65504
                 train_loader=tg.DataLoaderLite(4, 64, data_root=str(ROOT / "input.txt")))
    scaler = run.scaler
    before = [p.detach().clone() for p in model.parameters()]
    loss, norm = tg.train_step(run)
    assert math.isfinite(loss) and not math.isfinite(norm)  # a finite loss, an overflowing gradient: no divergence
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the step was skipped
    assert scaler.get_scale() == 2.0**39
    for _ in range(30):  # the scale halves at each overflow until the gradients fit, then steps resume
        loss, norm = tg.train_step(run)
    assert math.isfinite(norm)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


class DoublingScaler(torch.amp.GradScaler):
    """A loss scale that starts at 1 and doubles after every step (d2's fp16 gradients do not overflow below 2^6):
    8 at step 3's checkpoint, 64 after step 5. The default 65536 would not move in 6 steps."""

    def __init__(self, device="cuda", enabled=True, **kw):
        super().__init__(device, init_scale=1.0, growth_interval=1, enabled=enabled)


@needs_cuda
def test_fp16_run_resumes_exactly_with_its_scaler_state(tmp_path, capsys, monkeypatch):
    """A resume that dropped the scaler's state would start at scale 1 again and end at 8, not 64."""
    monkeypatch.setattr(torch.amp, "GradScaler", DoublingScaler)
    run_main(run_args(tmp_path / "full", dtype="float16", max_steps=6, checkpoint_every=3), capsys)
    checkpoint = torch.load(tmp_path / "full" / "model_00003.pt", weights_only=True)
    assert checkpoint["args"]["precision"] == "float16" and checkpoint["scaler"]["scale"] == 2.0**3
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(tmp_path / "full" / "model_00003.pt", resumed)
    run_main(run_args(resumed, dtype="float16", max_steps=6, checkpoint_every=3) + ["--resume"], capsys)
    full, part = train_losses(tmp_path / "full"), train_losses(resumed)
    assert_losses_close({s: full[s] for s in part}, part, 1e-3)
    assert sorted(part) == [3, 4, 5]
    for log_dir in (tmp_path / "full", resumed):
        assert torch.load(log_dir / "model_00006.pt", weights_only=True)["scaler"]["scale"] == 2.0**6, log_dir


# -----------------------------------------------------------------------------
# --batch_size auto under compile (and FSDP), MFU


@pytest.fixture
def gpu_with_12_gib_free():
    """Another process holds all but 12 GiB of the GPU, as a co-tenant would: the micro-batch is memory-bound."""
    torch.cuda.empty_cache()
    hold = torch.cuda.mem_get_info()[0] - 12 * 2**30
    if hold < 2**30:
        pytest.skip("needs a GPU with more than 13 GiB free")
    code = ("import sys, time, torch\nx = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device='cuda')\n"
            "print('holding', flush=True)\ntime.sleep(3600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(hold)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield
    finally:
        holder.kill()
        holder.wait()


@needs_cuda
@pytest.mark.parametrize("fsdp", [False, True])
def test_batch_size_auto_trains_without_oom_under_compile(tmp_path, gpu_with_12_gib_free, fsdp):
    """gpt2 (124M) at T=512 in 12 GiB: the probe must pick a micro-batch below the largest the total batch allows
    (128), and the compiled run at that micro-batch must not run out of memory. The step lines show the MFU."""
    argv = run_args(tmp_path / "log", model="gpt2", seq_len=512, total_batch_size=128 * 512, max_steps=3,
                    batch_size="auto", dtype="auto", compile=1)
    out = launch(argv + (["--fsdp"] if fsdp else []), tmp_path, nproc=1 if fsdp else None)
    B = int(re.search(r"--batch_size auto: micro-batch (\d+)", out).group(1))
    assert 1 <= B < 128, out[-3000:]
    assert len(train_losses(tmp_path / "log")) == 3
    peak = common.gpu_peak_flops(torch.cuda.get_device_name())
    if peak:
        mfu = float(re.search(r"step +2\b.* mfu ([0-9.]+)%", out).group(1))
        assert 0 < mfu < 100, out[-3000:]


# torch.cuda.get_device_name() as these GPUs report it -> the datasheet's dense bf16 (V100, T4: fp16) FLOP/s
DATASHEET_PEAKS = [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA A10G", 70e12),
    ("NVIDIA A10", 125e12), ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA GeForce RTX 3090", 71e12),
    ("NVIDIA RTX A6000", 155e12), ("Tesla V100-SXM2-16GB", 125e12), ("Tesla T4", 65e12),
    ("AMD Instinct MI300X", None), ("NVIDIA GeForce GTX 1080", None),
]


@pytest.mark.parametrize("name, peak", DATASHEET_PEAKS)
def test_peak_flops_table_maps_device_names_to_their_datasheet_peak(name, peak):
    """A name containing a shorter key (L40S: L40, L4; A10G: A10; H100 PCIe: H100) gets its own entry."""
    assert common.gpu_peak_flops(name) == peak


@needs_cuda
def test_peak_flops_table_knows_this_gpu():
    name = torch.cuda.get_device_name()
    keys = [key for key, _ in common.GPU_PEAK_FLOPS if key in name]
    if not keys:
        pytest.skip(f"{name} is not in GPU_PEAK_FLOPS (common.py): add its dense bf16 peak to get an MFU")
    # the most specific key naming this GPU decides, not a shorter one listed first
    assert common.gpu_peak_flops(name) == dict(common.GPU_PEAK_FLOPS)[max(keys, key=len)], (name, keys)


@needs_cuda
def test_live_metrics_log_peak_memory_and_mfu(tmp_path):
    """--tensorboard on a GPU: peak memory every step, and MFU where the peak table knows the GPU (bf16)."""
    tg.main(run_args(tmp_path / "log", max_steps=2, dtype="bfloat16") + ["--tensorboard"])
    tb, _ = tensorboard_events(tmp_path / "log")
    assert sorted(tb["memory/peak_gib"]) == [0, 1] and all(0 < float(v) < 200 for v in tb["memory/peak_gib"].values())
    if common.gpu_peak_flops(torch.cuda.get_device_name()) is not None:
        assert sorted(tb["perf/mfu_percent"]) == [0, 1]
        assert all(0 < float(v) < 100 for v in tb["perf/mfu_percent"].values())
    else:
        assert "perf/mfu_percent" not in tb


# -----------------------------------------------------------------------------
# Muon, sampling, HellaSwag, checkpoints across devices


@needs_cuda
@pytest.mark.parametrize("shape", [(256, 128), (128, 512)])
def test_muon_newton_schulz_on_cuda_equals_cpu(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    cpu, gpu = tg.newton_schulz(G).float(), tg.newton_schulz(G.cuda()).float().cpu()
    # both are bf16 iterations: each is within ~3% of the float32 result (measured on CPU), so within 6% of each other
    assert rel_err(gpu, cpu) < 6e-2
    singular = torch.linalg.svdvals(gpu)
    assert singular.min() > 0.5 and singular.max() < 1.3


@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 0.15)])
def test_kv_cache_sampling_equals_no_cache(dtype, tol):
    """Each greedy token of the cached generate() is the argmax of a full forward over the sequence so far, up to
    ties within tol (bf16 rounds cached and full attention differently)."""
    model = tiny_model().eval()
    prompt = tokens(2, 8)
    with torch.no_grad(), common.autocast_context("cuda", dtype):
        out = model.generate(prompt, 24, temperature=0)
        logits = model(out)[0].float()[:, :, : tg.GPT2_VOCAB]
    for t in range(8, out.size(1)):
        picked = logits[:, t - 1].gather(1, out[:, t : t + 1]).squeeze(1)
        assert (picked >= logits[:, t - 1].max(dim=1).values - tol).all(), t


@needs_cuda
def test_hellaswag_on_cuda_equals_cpu(hellaswag_sample):
    model = tiny_model(device="cpu", block_size=1024).eval()  # the rows are up to ~200 tokens
    examples = hellaswag.load_examples(data=hellaswag_sample)
    results = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        losses = [hellaswag.score_rows(model, t.to(device), m.to(device))[1].cpu() for t, m, _ in examples]
        results[device] = torch.stack(losses), hellaswag.evaluate(model, device, data=str(hellaswag_sample))
    assert torch.allclose(results["cuda"][0], results["cpu"][0], atol=1e-3)
    assert results["cuda"][1] == results["cpu"][1]


@needs_cuda
def test_checkpoint_written_on_cuda_resumes_on_cpu_and_back(tmp_path, capsys):
    """cuda: steps 0-3. cpu: from the cuda checkpoint of step 2. cuda again: from the cpu checkpoint of step 3.
    The losses are the cuda run's (TF32 on the GPU, exact float32 on the CPU: close, not equal)."""
    run_main(run_args(tmp_path / "cuda", checkpoint_every=2), capsys)
    (tmp_path / "cpu").mkdir()
    shutil.copy(tmp_path / "cuda" / "model_00002.pt", tmp_path / "cpu")
    run_main(run_args(tmp_path / "cpu", device="cpu", checkpoint_every=1) + ["--resume"], capsys)
    (tmp_path / "back").mkdir()
    shutil.copy(tmp_path / "cpu" / "model_00003.pt", tmp_path / "back")
    run_main(run_args(tmp_path / "back") + ["--resume"], capsys)
    reference = train_losses(tmp_path / "cuda")
    cpu, back = train_losses(tmp_path / "cpu"), train_losses(tmp_path / "back")
    assert sorted(cpu) == [2, 3] and sorted(back) == [3]
    assert_losses_close({s: reference[s] for s in cpu}, cpu, 2e-2)
    assert_losses_close({3: reference[3]}, back, 2e-2)


# -----------------------------------------------------------------------------
# FSDP and DDP on GPUs


@needs_cuda
@pytest.mark.parametrize("dtype, arch, tol", [("float32", "gpt2", 1e-3), ("bfloat16", "modern", 5e-2)])
def test_fsdp_on_one_gpu_equals_plain(tmp_path, capsys, dtype, arch, tol):
    """FSDP over one rank (per-block compile) against the plain uncompiled run: float32 to 1e-3 (TF32 both);
    bf16 only close (FSDP casts the weights and runs the norms in bf16, autocast keeps them in float32)."""
    run_main(run_args(tmp_path / "plain", dtype=dtype, arch=arch), capsys)
    launch(run_args(tmp_path / "fsdp", dtype=dtype, arch=arch, compile=1) + ["--fsdp"], tmp_path, nproc=1)
    assert_losses_close(train_losses(tmp_path / "plain"), train_losses(tmp_path / "fsdp"), tol)


@needs_2_gpus
def test_nccl_ddp_equals_single_process_and_fsdp_equals_ddp(tmp_path, capsys):
    run_main(run_args(tmp_path / "single"), capsys)
    launch(run_args(tmp_path / "ddp"), tmp_path, nproc=2)
    launch(run_args(tmp_path / "fsdp") + ["--fsdp"], tmp_path, nproc=2)
    single, ddp, fsdp = (train_losses(tmp_path / name) for name in ("single", "ddp", "fsdp"))
    assert_losses_close(single, ddp, 1e-3)
    assert_losses_close(ddp, fsdp, 1e-3)


@needs_2_gpus
def test_ranks_without_local_rank_take_one_gpu_each(tmp_path):
    """A launcher that sets RANK and WORLD_SIZE but not LOCAL_RANK (srun, mpirun): NCCL refuses two ranks on one
    GPU ("Duplicate GPU"), so both ranks finishing means each took its own."""
    procs = []
    for rank in range(2):
        env = {**run_env(), "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29731"}
        for name in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
            env.pop(name, None)
        cmd = [sys.executable, str(ROOT / "train_gpt2.py"), *run_args(tmp_path / "log", max_steps=2)]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert "device cuda:0 x 2" in outs[0]


@needs_2_gpus
def test_single_process_on_a_second_gpu_stays_there(tmp_path, capsys):
    try:
        run_main(run_args(tmp_path / "log", device="cuda:1", max_steps=2), capsys)
        assert torch.cuda.current_device() == 1  # seeding, synchronize and the dtype choice act on cuda:1
        assert torch.cuda.max_memory_allocated(1) > 0
    finally:
        torch.cuda.set_device(0)


# -----------------------------------------------------------------------------
# The same paths' logic on a CPU: faked memory queries and torch.cuda calls, inductor's partitioner, gloo ranks


def test_fsdp_batch_size_auto_sizes_the_sharded_model_and_probes_nothing_that_overflows(monkeypatch):
    """gpt2-xl under FSDP over 8 GPUs of 40 GiB: 8 sequences fit (docs/fsdp.md). Sized for the whole model with
    DDP's state, as before, not even 1 did. A stand-in for the probe (the state, 2 GiB for a loss chunk and two
    gathered blocks, 2550 KiB of activations per token) fails if asked for a micro-batch that overflows the GPU:
    under FSDP one rank running out of memory would leave the others waiting in an all-gather."""
    GiB = 2**30
    with torch.device("meta"):
        model = tg.GPT(tg.model_config("gpt2-xl"))
    shard = 4 * model.num_params() // 8  # this rank's float32 parameters
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * GiB - shard, 40 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: shard)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: shard)
    probed = []

    def probe(model, B, T, device, dtype):
        probed.append(B)
        peak = 2 * shard + 2 * GiB + B * T * 2550 * 1024  # parameter and gradient shards, loss chunk, activations
        assert peak <= 40 * GiB, f"probed B={B}, which runs out of memory"
        return peak

    monkeypatch.setattr(sharding, "cuda_probe_peak", probe)
    ctx = common.DistContext(ddp=False, rank=0, local_rank=0, world_size=8, device="cuda:0")
    assert sharding.fsdp_batch_size(model, ctx, torch.float32, 1024, 64, lambda b: 4096) == 8
    assert probed == [1, 2, 4, 8]  # 16 was predicted not to fit: not probed
    n = model.num_params()
    # AdamW's moments are sharded; FSDP accumulates unsharded float32 gradients between micro-steps
    assert sharding.training_state_bytes(n, ddp=True, fsdp_shards=8, accumulating=True) == n + 4 * n
    assert sharding.training_state_bytes(n, ddp=True, fsdp_shards=8, accumulating=False) == n


def test_fp16_chunked_loss_under_compile_keeps_no_chunk_of_logits():
    """Inductor's partitioner (min-cut rematerialization, here with trivial compilers so it runs on a CPU) merged
    the fp16 loss's backward recomputation of x @ W.T with the forward's and saved every chunk's fp16 logits."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep, partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    rows, vocab, chunk = 64, 1000, 16
    x = torch.randn(rows, 32, requires_grad=True)
    w = torch.randn(vocab, 32, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))

    def loss_fn(x, w, targets):
        with torch.autocast("cpu", dtype=torch.float16):
            return tg.chunked_cross_entropy(x, w, targets, chunk)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = torch.compile(loss_fn, backend=backend)(x, w, targets)
    loss.backward()
    assert saved and not [s for s in saved if s[-1:] == (vocab,) and s != (vocab, 32)], saved
    assert torch.isfinite(x.grad).all() and w.grad.abs().sum() > 0


def test_single_process_on_cuda_n_sets_that_device(monkeypatch):
    """Without set_device, seeding, synchronize, the capability query (the dtype) and the RNG state act on GPU 0."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    ctx = common.setup_distributed("cuda:1")
    assert ctx.device == "cuda:1" and chosen == ["cuda:1"]


LOCAL_RANK_CASES = [({}, "cuda:1"), ({"SLURM_LOCALID": "0"}, "cuda:0"), ({"OMPI_COMM_WORLD_LOCAL_RANK": "1"}, "cuda:1"),
                    ({"LOCAL_RANK": "0"}, "cuda:0")]


@pytest.mark.parametrize("env, device", LOCAL_RANK_CASES)
def test_ranks_without_local_rank_take_their_gpu_on_the_node(monkeypatch, env, device):
    """srun or mpirun set RANK and WORLD_SIZE but not LOCAL_RANK: global rank 3 of 4 on nodes of 2 GPUs is GPU 1
    there (not GPU 0 for every rank: NCCL's "Duplicate GPU"). torch.cuda and the NCCL group are stand-ins."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    chosen, groups = [], []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: groups.append(kw))
    monkeypatch.setattr(torch.distributed, "new_group", lambda **kw: None)  # the file I/O group
    ctx = common.setup_distributed("cuda")
    assert ctx.device == device and chosen == [device] and groups[0]["device_id"] == torch.device(device)
    assert ctx.rank == 3 and ctx.world_size == 4


def mapped_file(address):
    """The file mapped at this address of the process (Linux), or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(a, 16) for a in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else None
    return None


def test_checkpoints_load_memory_mapped(tmp_path):
    """Every rank loads the checkpoint: memory-mapped, its tensors are pages of the file in the page cache, shared by
    the ranks of a node and read only where used (--init_from never reads the optimizer state)."""
    model = tg.GPT(tg.GPTConfig(block_size=16, vocab_size=128, n_layer=1, n_head=2, n_embd=16))
    optimizer = tg.configure_optimizers(model, 0.1, 1e-3, "cpu")
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    path = tmp_path / "model_00000.pt"
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": tg.asdict(model.config)}
    checkpoints.write_atomically({**state, "step": 0}, str(path))
    checkpoint = tg.load_checkpoint(str(path))
    assert mapped_file(checkpoint["model"]["lm_head.weight"].data_ptr()) == str(path)
    loaded = tg.GPT.from_pretrained(str(path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # on a CPU AdamW would keep the tensors it is given: its state must not stay pages of the file
    resumed = tg.configure_optimizers(loaded, 0.1, 1e-3, "cpu")
    sharding.load_optimizer_state(loaded, resumed, checkpoint["optimizer"])
    moments = [v for s in resumed.state.values() for v in s.values() if v.dim()]
    assert moments and not any(mapped_file(v.data_ptr()) == str(path) for v in moments)


def test_resume_skips_a_sampling_rng_state_of_another_device_type():
    """A CUDA generator's state is 16 bytes (seed, offset), a CPU generator's 5056: a checkpoint written on a GPU
    resumes on a CPU and back, with the sampling generator left as seeded (the losses do not depend on it)."""
    generator = torch.Generator().manual_seed(42)
    state = common.get_rng_state(generator)
    before = generator.get_state()
    common.set_rng_state({**state, "sample": torch.zeros(16, dtype=torch.uint8)}, generator)
    assert torch.equal(generator.get_state(), before)


def test_fsdp_needs_a_torch_with_fsdp2_in_torch_distributed_fsdp(monkeypatch, capsys, tmp_path):
    """torch 2.4 and 2.5 (requirements.txt allows them) have FSDP2 only under torch.distributed._composable."""
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)  # its import fails, as on those versions
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as e:
        tg.main(["--fsdp", "--data", str(ROOT / "input.txt"), "--log_dir", str(tmp_path / "log"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --fsdp needs torch") and err.count("\n") == 1


@pytest.mark.parametrize("arch, fused, expected", [("gpt2", False, False), ("modern", True, True), ("modern", False, False)])
def test_full_logits_budget_counts_the_eager_soft_caps_copies(monkeypatch, arch, fused, expected):
    """gpt2 at B=64, T=1024: 13.2 GB of float32 logits fit a quarter of 79 GB free. The modern head's soft-cap,
    eager (--compile 0, or under FSDP, whose root is not compiled), keeps several such tensors: chunks then."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (79 * 2**30, 80 * 2**30))
    model = tg.GPT(tg.model_config("d1", block_size=64, arch=arch))
    ctx = common.DistContext(ddp=False, rank=0, local_rank=0, world_size=1, device="cuda:0")
    assert sharding.full_logits_fit(model, ctx, 64, 1024, fused_head=fused) == expected
    assert sharding.full_logits_fit(model, ctx, 8, 1024, fused_head=fused)


def test_train_step_lets_the_logits_go_before_backward(tmp_path, shakespeare_file):
    """The full-logits path returns (logits, loss) and the step uses the loss only: logits kept until the next
    forward are B*T*vocab more bytes through backward (6.6 GB in bf16 for gpt2 at B=64)."""

    class Watch(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.alive_in_backward = model, []

        def forward(self, x, y):
            logits, loss = self.model(x, y)
            ref = weakref.ref(logits)
            loss.register_hook(lambda grad: self.alive_in_backward.append(ref() is not None))
            return logits, loss

    model = tg.GPT(tg.GPTConfig(block_size=32, vocab_size=512, n_layer=1, n_head=2, n_embd=32))
    model.loss_chunk_size = 0
    watch = Watch(model)
    text = tmp_path / "shakespeare_20k.txt"
    text.write_text(shakespeare_file.read_text()[:20000])
    loader = tg.DataLoaderLite(2, 32, data_root=str(text))
    loader.shards = [s % 512 for s in loader.shards]  # the tiny vocab
    ctx = common.DistContext(ddp=False, rank=0, local_rank=0, world_size=1, device="cpu")
    args = argparse.Namespace(grad_clip=1.0, total_batch_size=2 * 2 * 32, seq_len=32)  # 2 micro-steps of 2 x 32
    tg.train_step(tg.Run(args, ctx, torch.float32, batch_size=2, train_model=watch, train_loader=loader,
                         optimizer=tg.configure_optimizers(model, 0.1, 1e-3, "cpu"),
                         scaler=torch.amp.GradScaler("cpu", enabled=False)))
    assert watch.alive_in_backward == [False, False]


FSDP_WORKER = """
import os, sys
import torch
import common
import sharding
import train_gpt2 as tg
from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


ctx = common.setup_distributed("cpu")
out = open(sys.argv[1] + str(ctx.rank), "w")
# --fsdp --arch modern in bf16: the rotary tables stay float32, as under DDP's autocast
torch.manual_seed(0)
model = tg.GPT(tg.model_config("d2", block_size=64, arch="modern"))
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))  # the modern head starts at zero: every loss would be ln(vocab)
# FSDP's computation in one process: the weights in bf16, no autocast, the rotary tables float32
plain = tg.GPT(model.config)
plain.load_state_dict(model.state_dict())
plain.transformer.bfloat16()
plain.lm_head.bfloat16()
x = torch.randint(0, tg.GPT2_VOCAB, (2, 32), generator=torch.Generator().manual_seed(ctx.rank))
with torch.no_grad():
    plain_loss = plain(x, x)[1].item()
cos_dtypes = []
apply_rotary = tg.apply_rotary
tg.apply_rotary = lambda t, cos, sin: cos_dtypes.append(cos.dtype) or apply_rotary(t, cos, sin)
sharding.shard_model(model, ctx, torch.bfloat16)
fsdp = model
_, loss = fsdp(x, x)
loss.backward()
out.write(f"rotary {sorted(set(map(str, cos_dtypes)))} loss {loss.item():.6f} plain {plain_loss:.6f}\\n")
# clip_grad_norm_ on DTensor gradients: the foreach path, a few dispatches whatever the number of parameters
with CountOps() as count:
    torch.nn.utils.clip_grad_norm_(fsdp.parameters(), 1.0)
out.write(f"clip dispatches {count.ops} parameters {len(list(fsdp.parameters()))}\\n")
# --batch_size auto: rank 1 finds nothing fits; both ranks stop with the error, none waits in the all-reduce
for fits in (lambda b: ctx.rank == 0, lambda b: b <= 4 - 2 * ctx.rank):
    try:
        out.write(f"batch size {sharding.agree_batch_size(lambda: sharding.find_batch_size(fits, 8), ctx)}\\n")
    except tg.UsageError as e:
        out.write(f"UsageError {e}\\n")
out.close()
torch.distributed.destroy_process_group()
os._exit(0)  # as train_gpt2.py's workers end: a gloo thread that outlives the group can abort Python's teardown
"""


def test_fsdp_and_auto_batch_size_on_two_gloo_ranks(tmp_path):
    """torchrun x2 (gloo, CPU), one launch for three checks of FSDP and --batch_size auto across ranks."""
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path / "rank")]
    p = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for rank in range(2):
        lines = (tmp_path / f"rank{rank}").read_text().splitlines()
        dtypes, loss, plain = re.fullmatch(r"rotary (.*) loss (\S+) plain (\S+)", lines[0]).groups()
        assert dtypes == "['torch.float32']"
        assert abs(float(loss) - float(plain)) < 2e-5  # the rotary tables cast to bf16 moved it by 3e-4
        ops, params = map(int, re.fullmatch(r"clip dispatches (\d+) parameters (\d+)", lines[1]).groups())
        assert ops < params  # not a norm per parameter
        assert lines[2].startswith("UsageError --batch_size auto: not even a micro-batch of 1 fits")
        assert lines[3] == "batch size 2"  # the smallest over the ranks
