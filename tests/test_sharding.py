"""Tests of sharding.py: what fits in GPU memory (the loss path), and what --fsdp compiles. All on CPU."""

import pytest
import torch

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
