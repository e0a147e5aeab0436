"""Tests of sharding.py: what fits in GPU memory (the loss path, the micro-batch size), and what --fsdp
compiles and refuses. All on CPU."""

import pytest
import torch

import checks
import common
import sharding
import train_gpt2 as tg


def saved_logits_copies(arch, B=2, T=16, V=512):
    """How many float32 (B, T, V) tensors the eager full-logits loss saves for backward, under bf16 autocast
    (distinct tensors, in float32-equivalents: a bf16 one counts a half)."""
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=T, vocab_size=V, n_layer=1, n_head=2, n_embd=16, arch=arch))
    model.loss_chunk_size = 0  # the full-logits path
    idx = torch.randint(0, V, (B, T))
    saved = {}

    def pack(t):
        if t.numel() == B * T * V:
            saved[t.untyped_storage().data_ptr()] = t.element_size() / 4
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, idx)
    return sum(saved.values())


@pytest.mark.parametrize("arch, copies", [("gpt2", "EAGER_GPT2_LOGITS_COPIES"),
                                          ("modern", "EAGER_SOFTCAP_LOGITS_COPIES")])
def test_eager_head_logits_copies_are_what_it_saves_and_its_gradients(arch, copies):
    # in log-softmax's backward: its saved output, the gradient coming in and the one going out
    assert saved_logits_copies(arch) + 2 == getattr(sharding, copies)


def test_eager_gpt2_head_counts_its_copies(monkeypatch):
    """GPT-2 at B=16, T=1024: float32 logits of 3.3 GB, three copies (eager: FSDP, or --compile 0) 9.9 GB, more than
    a quarter of 32 GB free; fused (compiled) only the one."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (32 * 2**30, 80 * 2**30))
    model = tg.GPT(tg.GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32))
    ctx = common.DistContext(ddp=False, rank=0, local_rank=0, world_size=1, device="cuda:0")
    assert sharding.full_logits_fit(model, ctx, 16, 1024, fused_head=True)
    assert not sharding.full_logits_fit(model, ctx, 16, 1024, fused_head=False)


def test_compiled_blocks_compile_training_only(monkeypatch):
    """--fsdp --compile 1 compiles each block (compile_blocks): training's forward and backward run the compiled
    blocks, sampling (KV-cache prefill, one-token decode steps) and HellaSwag (logits_at, varying shapes) the eager
    ones, so that they compile no graphs at all. Counted with an eager backend that records every graph handed to it
    (the default backend for the test: production's stays inductor)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)  # a count, not a fallback to eager
    torch.compiler.set_default_backend(counting_backend)
    try:
        torch.manual_seed(0)
        model = tg.GPT(tg.GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=16))
        sharding.compile_blocks(model)
        model.train()
        x = torch.randint(0, 128, (2, 16))
        model(x, x)[1].backward()
        trained = len(graphs)
        model.eval()
        with torch.no_grad():
            model.generate(x[:, :5], 4, generator=torch.Generator().manual_seed(0))
            model.logits_at(x[:1, :7], torch.ones(1, 7, dtype=torch.bool))
        assert trained > 0 and len(graphs) == trained, f"{trained} graphs for training, {len(graphs)} in all"
    finally:
        torch.compiler.set_default_backend(None)
        torch._dynamo.reset()


def test_find_batch_size_picks_the_largest_fitting_divisor_of_the_total_batch():
    # a GPU with a byte budget: 1 GB for the model and its optimizer state, 96 MB per sequence
    tried = []

    def fits(b):
        tried.append(b)
        return 1e9 + b * 96e6 <= 2.3e9  # up to B=13

    assert sharding.find_batch_size(fits, 48) == 12  # 48 = total_batch_size // (T * world_size); powers of two gave 8
    assert len(tried) <= 5  # bisection over the 10 divisors of 48, from the top
    tried.clear()
    assert sharding.find_batch_size(fits, 64) == 8 and tried[0] == 64
    assert sharding.find_batch_size(lambda b: True, 48) == 48
    assert sharding.find_batch_size(lambda b: b <= 4, 7) == 1  # 7 is prime: only 1 divides it
    with pytest.raises(tg.UsageError, match="not even a micro-batch of 1"):
        sharding.find_batch_size(lambda b: False, 64)


def test_choose_batch_size_auto_divides_the_total_batch_on_cpu():
    model = tg.GPT(tg.GPTConfig(block_size=1024, n_layer=1, n_head=2, n_embd=32))
    ctx = common.DistContext(ddp=False, rank=0, local_rank=0, world_size=1, device="cpu")
    args = tg.parse_args(["--batch_size", "auto", "--seq_len", "1024", "--total_batch_size", str(12 * 1024)])
    B = sharding.choose_batch_size(model, ctx, torch.float32, 1024, args.total_batch_size, lambda b: 1024)
    assert B == 6  # B*T <= 8192 and B divides 12; the old power of two (8) failed the total batch's check
    checks.check_batch(args.total_batch_size, B, 1024, 1)  # 2 micro-steps
    with pytest.raises(tg.UsageError, match="not a multiple of seq_len"):
        sharding.choose_batch_size(model, ctx, torch.float32, 1024, 1000, lambda b: 1024)


def test_batch_probe_budget_counts_the_optimizer_state(monkeypatch):
    # the memory queries of a GPU with 40 GB free and 2 GB already ours; nothing else is faked
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * 2**30)
    model = tg.GPT(tg.GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    # what a probe does not allocate, measured: the real optimizer's state after a step, and (DDP) its float32
    # gradient buckets, a copy of the gradients
    optimizer = tg.configure_optimizers(model, 0.1, 6e-4, "cpu")
    x = torch.randint(0, 50257, (1, 8))
    model(x, x)[1].backward()
    optimizer.step()
    held = sharding.state_bytes_per_rank(model, optimizer)
    moments = held["optimizer"] - 4 * len(optimizer.state)  # less each parameter's float32 step count
    for ddp, extra in ((False, 0), (True, held["gradients"])):
        ctx = common.DistContext(ddp=ddp, rank=0, local_rank=0, world_size=1, device="cuda:0")
        assert sharding.cuda_usable_bytes(ctx) == 42 * 2**30
        assert sharding.training_state_bytes(model.num_params(), ctx.ddp) == moments + extra


@pytest.mark.parametrize("free_gb, device, expected", [(79, "cuda:0", True), (40, "cuda:0", False), (79, "cpu", False)])
def test_training_loss_path_is_full_logits_on_gpus_with_room(monkeypatch, free_gb, device, expected):
    # gpt2 at B=64, T=1024: float32 logits of 13.2 GB; full logits (build-nanogpt's path) when they take at most
    # a quarter of the free memory (an 80 GB GPU), chunks otherwise (a 40 GB one) and always on CPUs
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gb * 2**30, 80 * 2**30))
    model = tg.GPT(tg.GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32))
    ctx = common.DistContext(ddp=False, rank=0, local_rank=0, world_size=1, device=device)
    assert sharding.full_logits_fit(model, ctx, 64, 1024) == expected
    assert sharding.full_logits_fit(model, ctx, 8, 1024) == (device != "cpu")


def test_fsdp_refuses_float16_in_one_line():
    """Raised in shard_model before the device mesh (so no process group is needed here); under torchrun main()
    prints it as one line and exits 2, as every UsageError."""
    model = tg.GPT(tg.GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    ctx = common.DistContext(ddp=True, rank=0, local_rank=0, world_size=2, device="cpu")
    with pytest.raises(tg.UsageError, match=r"--fsdp runs in bfloat16 or float32 .*--dtype bfloat16") as e:
        sharding.shard_model(model, ctx, torch.float16)
    assert "\n" not in str(e.value)
