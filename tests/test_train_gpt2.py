"""Tests of train_gpt2.py: the model against transformers' GPT-2, sampling, data, optimization, the training CLI
(single process and torchrun), checkpoints and exact resume. All on CPU, offline."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tiktoken
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import train_gpt2 as tg
from conftest import ROOT, run_env

torch.set_num_threads(2)


def hf_tiny(tmp_path, n_layer=2, n_head=2, n_embd=64, n_positions=128, seed=0, std=0.02):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, initializer_range=std)
    hf = GPT2LMHeadModel(config).eval()
    path = tmp_path / f"hf_{n_layer}_{n_embd}"
    hf.save_pretrained(path)
    return hf, path


def run_cli(args, cwd, check=True, timeout=300, **kw):
    cmd = [sys.executable, str(ROOT / "train_gpt2.py"), *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, env=run_env(), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_log(log_dir):
    out = {}
    with open(os.path.join(log_dir, "log.txt")) as f:
        for line in f:
            step, stream, value = line.split()
            out[(int(step), stream)] = float(value)
    return out


def tiny_run_args(data, log_dir, **overrides):
    """A d2 model on Tiny Shakespeare: a few seconds for ~10 steps on CPU."""
    flags = dict(
        data=data, model="d2", batch_size=4, seq_len=64, total_batch_size=512, max_steps=12, warmup_steps=2,
        max_lr=3e-3, val_every=4, val_steps=2, hellaswag_every=0, sample_every=0, checkpoint_every=6,
        log_dir=log_dir, device="cpu", dtype="float32", compile=0,
    )
    flags.update(overrides)
    args = []
    for k, v in flags.items():
        args += [f"--{k}", v]
    return args


# -----------------------------------------------------------------------------
# model


@pytest.mark.parametrize("shape", [dict(n_layer=2, n_head=2, n_embd=64, n_positions=128), dict(n_layer=3, n_head=4, n_embd=96, n_positions=64)])
def test_logits_match_transformers(tmp_path, shape):
    hf, path = hf_tiny(tmp_path, **shape)
    model = tg.GPT.from_pretrained(path).eval()
    assert model.config.n_layer == shape["n_layer"] and model.config.block_size == shape["n_positions"]
    idx = torch.randint(0, 50257, (2, shape["n_positions"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("vocab_size", [50257, 50304])
def test_save_pretrained_round_trip(tmp_path, vocab_size):
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=64)).eval()
    model.save_pretrained(tmp_path / "export")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    assert hf.config.vocab_size == 50257 and hf.config.n_positions == 64
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours[..., :50257] - theirs).abs().max().item() < 1e-4
    # and back into ours
    again = tg.GPT.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert torch.allclose(again(idx)[0], ours[..., :50257], atol=1e-5)


def test_export_cli_writes_a_directory_pipeline_can_use(tmp_path, shared_data):
    from transformers import AutoTokenizer, pipeline

    _, path = hf_tiny(tmp_path, n_layer=2, n_head=2, n_embd=64, std=0.2)  # larger weights: a less repetitive greedy text
    run_cli(["--init_from", path, "--export", tmp_path / "export"], tmp_path)
    enc = tiktoken.get_encoding("gpt2")
    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    fineweb = (shared_data / "fineweb_sample" / "fineweb_sample_300.jsonl").read_text().splitlines()[:20]
    texts = [(shared_data / "tinyshakespeare" / "input.txt").read_text()[:20000], "x <|endoftext|> y \u00fc\u65e5 \U0001f917  \n\n\t"]
    texts += [json.loads(line)["text"] for line in fineweb]
    for text in texts:
        assert tok(text)["input_ids"] == enc.encode(text, allowed_special="all")
    assert tok.eos_token_id == 50256
    # greedy decoding through transformers' pipeline gives our tokens
    prompt = "Hello, I'm a language model,"
    generate = pipeline("text-generation", model=str(tmp_path / "export"), device="cpu")
    theirs = generate(prompt, max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    ours = tg.GPT.from_pretrained(tmp_path / "export").eval().generate(torch.tensor([enc.encode(prompt)]), 12, top_k=1)
    assert list(theirs) == ours[0].tolist()


def test_gpt2_init_and_weight_tying():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(n_layer=8, n_head=4, n_embd=256))
    assert model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.h[0]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.002
    expected = 0.02 / math.sqrt(2 * 8)
    for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
        assert abs(w.std().item() - expected) < 0.1 * expected
    assert block.attn.c_attn.bias.abs().max().item() == 0
    # 124M: the number everyone quotes (tied embeddings counted once)
    n = sum(p.numel() for p in tg.GPT(tg.GPTConfig()).parameters())
    assert n == 124439808


def test_loss_ignores_minus_one_targets():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    idx = torch.randint(0, 50257, (2, 16))
    targets = torch.randint(0, 50257, (2, 16))
    targets[:, 8:] = -1
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, logits.size(-1)), targets[:, :8].reshape(-1))
    for chunk in (0, 5, None):  # full logits, chunks, the device's default
        model.loss_chunk_size = chunk
        _, loss = model(idx, targets)
        assert torch.allclose(loss, expected, atol=1e-6), chunk


@pytest.mark.parametrize("ignore", [False, True])
def test_chunked_loss_equals_full_logits_loss_and_gradients(ignore):
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64))
    idx = torch.randint(0, 50257, (3, 40))
    targets = torch.randint(0, 50257, (3, 40))
    if ignore:
        targets[0, :25] = -1
    model.loss_chunk_size = 0  # full logits
    logits, loss_full = model(idx, targets)
    assert logits.shape == (3, 40, 50304)
    loss_full.backward()
    grads_full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.loss_chunk_size = 32  # 120 rows -> 4 chunks
    logits, loss_chunked = model(idx, targets)
    assert logits is None
    loss_chunked.backward()
    assert torch.allclose(loss_full, loss_chunked, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(grads_full[n], p.grad, rtol=1e-4, atol=1e-6), n
    # no grad (eval): the same number
    with torch.no_grad():
        assert torch.allclose(model(idx, targets)[1], loss_full, atol=1e-6)


def test_chunked_loss_under_bf16_autocast_is_close_in_loss_and_gradients():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64))
    idx, targets = torch.randint(0, 50257, (2, 64)), torch.randint(0, 50257, (2, 64))
    results = {}
    for chunk in (0, 50):  # full logits, then 3 chunks
        model.zero_grad()
        model.loss_chunk_size = chunk
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        results[chunk] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    (full, g_full), (chunked, g_chunked) = results[0], results[50]
    assert abs(full - chunked) < 1e-2
    # the same gradients to bf16 precision (8 bits of mantissa), direction and size
    assert torch.nn.functional.cosine_similarity(g_full, g_chunked, dim=0) > 0.999
    assert (g_full - g_chunked).norm() / g_full.norm() < 2e-2


def greedy_without_cache(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat([idx, logits[:, -1, :50257].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_generate_greedy_with_cache_matches_full_forward_and_transformers(tmp_path):
    hf, path = hf_tiny(tmp_path, n_positions=64, std=0.2)
    model = tg.GPT.from_pretrained(path).eval()
    prompt = torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11]] * 2)
    prompt[1, 0] = 40  # two different rows in one batch
    ours = model.generate(prompt, 20, top_k=1)
    assert ours.shape == (2, 28)
    assert torch.equal(ours, greedy_without_cache(model, prompt, 20))
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False, pad_token_id=50256)
    assert torch.equal(ours, theirs)
    # past block_size the context is cropped; still the same as a full forward per token
    long = model.generate(prompt, 70, top_k=1)
    assert long.shape == (2, 78)
    assert torch.equal(long, greedy_without_cache(model, prompt, 70))


def test_generate_seeded_sampling_is_reproducible_and_never_picks_padding():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # make the padded ids by far the most likely: they must still never be sampled
        model.lm_head.weight[50257:] = model.lm_head.weight[:50257].abs().max() * 50
    prompt = torch.tensor([[1, 2, 3]] * 4)
    a = model.generate(prompt, 10, top_k=50, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 10, top_k=50, generator=torch.Generator().manual_seed(7))
    c = model.generate(prompt, 10, top_k=None, temperature=2.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert a.max().item() < 50257 and c.max().item() < 50257
    assert not torch.equal(a, c)


def test_tokenizer_is_the_real_gpt2_vocab():
    enc = tiktoken.get_encoding("gpt2")
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.eot_token == tg.GPT2_EOT


def test_from_pretrained_bad_inputs(tmp_path):
    with pytest.raises(tg.UsageError, match="gpt2-medium.*gpt2-xl") as e:
        tg.GPT.from_pretrained("gpt5")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(tg.UsageError, match="no config.json"):
        tg.GPT.from_pretrained(tmp_path / "empty")
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(3)}, bogus)
    with pytest.raises(tg.UsageError, match="not a checkpoint written by train_gpt2.py"):
        tg.GPT.from_pretrained(bogus)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(tg.UsageError, match="not a checkpoint"):
        tg.GPT.from_pretrained(text)


def test_sample_cli_from_hf_dir_and_bad_model(tmp_path):
    _, path = hf_tiny(tmp_path, n_positions=64)
    p = run_cli(["--init_from", path, "--sample", "Hello, I'm a language model,", "--num_samples", 3, "--max_new_tokens", 8, "--device", "cpu"], tmp_path)
    lines = [l for l in p.stdout.splitlines() if l.startswith("> ")]
    assert len(lines) == 3 and all(l.startswith("> Hello, I'm a language model,") for l in lines)
    p = run_cli(["--init_from", "gpt5", "--sample", "hi"], tmp_path, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "gpt2-medium" in p.stderr


# -----------------------------------------------------------------------------
# data


def write_shards(root, sizes, split="train", start=0):
    """Shards whose token at global offset i is i (mod 65536): which tokens a batch holds says where it came from."""
    root.mkdir(exist_ok=True)
    offset = start
    for i, n in enumerate(sizes):
        np.save(root / f"shard_{split}_{i:06d}.npy", (np.arange(offset, offset + n) % 65536).astype(np.uint16))
        offset += n


def test_dataloader_positions_per_rank(tmp_path):
    write_shards(tmp_path / "d", [1000])
    B, T = 2, 8
    for rank in range(3):
        loader = tg.DataLoaderLite(B, T, rank, 3, "train", tmp_path / "d")
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == (B, T)
        assert x.flatten()[0].item() == B * T * rank
        assert torch.equal(y, x + 1)
        x, _ = loader.next_batch()
        assert x.flatten()[0].item() == B * T * rank + B * T * 3


def test_dataloader_rolls_over_without_dropping_a_usable_batch(tmp_path):
    # 2*8 = 16 tokens a batch (+1 for the last target): a shard of 33 holds exactly 2 batches
    write_shards(tmp_path / "d", [33, 40])
    loader = tg.DataLoaderLite(2, 8, 0, 1, "train", tmp_path / "d")
    firsts = [loader.next_batch()[0].flatten()[0].item() for _ in range(5)]
    assert firsts == [0, 16, 33, 33 + 16, 0]  # both batches of shard 0, both of shard 1, wrap around


def test_dataloader_ranks_see_every_token_once_per_pass(tmp_path):
    sizes = [16 * 7 + 1, 16 * 5 + 3, 16 * 9 + 1]
    write_shards(tmp_path / "d", sizes)
    world, B, T = 3, 2, 8
    loaders = [tg.DataLoaderLite(B, T, r, world, "train", tmp_path / "d") for r in range(world)]
    seen = []
    for loader in loaders:
        # one pass of this rank: until it wraps back to its first batch
        first = loader.next_batch()[0]
        batches = [first]
        while True:
            x = loader.next_batch()[0]
            if torch.equal(x, first):
                break
            batches.append(x)
        seen += [t for b in batches for t in b.flatten().tolist()]
    assert len(seen) == len(set(seen))  # nothing seen twice
    usable = sum((n - 1) // (B * T) * (B * T) for n in sizes)
    assert len(seen) == usable  # every whole batch of every shard was read


def test_dataloader_state_dict_resumes_exactly(tmp_path):
    write_shards(tmp_path / "d", [50, 70, 60])
    a = tg.DataLoaderLite(2, 4, 1, 2, "train", tmp_path / "d")
    for _ in range(7):
        a.next_batch()
    b = tg.DataLoaderLite(2, 4, 1, 2, "train", tmp_path / "d")
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    a.reset()
    assert a.next_batch()[0].flatten()[0].item() == 8


def test_text_file_split(shakespeare):
    shards = tg.find_shards(str(shakespeare), "train") + tg.find_shards(str(shakespeare), "val")
    assert len(shards[0]) + len(shards[1]) == 338025  # the known token count of Tiny Shakespeare
    assert len(shards[1]) == 338025 // 10
    assert shards[0][:4].tolist() == [5962, 22307, 25, 198]


# -----------------------------------------------------------------------------
# optimization


def test_lr_schedule():
    kw = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073)
    assert tg.get_lr(0, **kw) == pytest.approx(6e-4 / 715)
    assert tg.get_lr(714, **kw) == pytest.approx(6e-4)
    assert tg.get_lr(715, **kw) == pytest.approx(6e-4)
    mid = 715 + (19073 - 715) // 2
    assert tg.get_lr(mid, **kw) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)
    assert tg.get_lr(19073, **kw) == pytest.approx(6e-5)
    assert tg.get_lr(30000, **kw) == pytest.approx(6e-5)
    lrs = [tg.get_lr(s, **kw) for s in range(715, 19073, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_optimizer_groups():
    model = tg.GPT(tg.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    opt = model.configure_optimizers(0.1, 6e-4, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) == 2 + 2 * 4  # wte (tied lm_head), wpe, 4 matmuls per block
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["fused"]


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    x, y = torch.randint(0, 50257, (8, 32)), torch.randint(0, 50257, (8, 32))
    _, loss = model(x, y)
    loss.backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    k = 4
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        _, loss = model(xs, ys)
        (loss / k).backward()
    for g, p in zip(big, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


def test_find_batch_size_halves_until_it_fits():
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 12

    assert tg.find_batch_size(fits, 64) == 8
    assert tried[:4] == [64, 32, 16, 8]
    assert tg.find_batch_size(lambda b: True, 48) == 32  # powers of two only
    with pytest.raises(tg.UsageError, match="not even a micro-batch of 1"):
        tg.find_batch_size(lambda b: False, 64)


def test_flops_and_peak_table():
    assert tg.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert tg.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert tg.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert tg.gpu_peak_flops("Some New GPU") is None
    assert tg.gpu_peak_flops("NVIDIA GH200 480GB") == 989e12 and tg.gpu_peak_flops("NVIDIA H200") == 989e12
    # gpt2 at T=1024: 6 x (50304 x 768 lm_head + 12 layers x 12 x 768^2) + 12 x 12 layers x 768 x 1024 (attention)
    assert tg.flops_per_token(tg.GPTConfig(vocab_size=50304), 1024) == 854_654_976


# -----------------------------------------------------------------------------
# the training CLI


def test_short_run_on_shakespeare_learns_and_logs(tmp_path, shakespeare):
    log_dir = tmp_path / "log"
    p = run_cli(tiny_run_args(shakespeare, log_dir, max_steps=50, total_batch_size=1024, val_every=25, checkpoint_every=0, sample_every=50), tmp_path)
    log = read_log(log_dir)
    train = [log[(s, "train")] for s in range(50)]
    assert train[0] > 10.0
    assert min(train[-5:]) < 7.0  # well below ln(50257) = 10.8
    assert {(0, "val"), (25, "val"), (50, "val")} <= log.keys()
    assert log[(50, "val")] < log[(0, "val")] - 3
    assert "sample 0: Hello, I'm a language model," in p.stdout
    # the final checkpoint loads safely and into a plain model
    ckpt = torch.load(log_dir / "model_00050.pt", weights_only=True)
    assert ckpt["step"] == 50 and ckpt["config"]["n_layer"] == 2
    model = tg.GPT.from_pretrained(log_dir / "model_00050.pt")
    assert model.config.vocab_size == 50304


# log.txt of this run with the seed's code (train_gpt2.py as first landed, float32 on this CPU): the default
# recipe's losses must never move when new methods land behind flags
SEED_LOG = {
    (0, "val"): 10.7825, (0, "train"): 10.792830, (1, "train"): 10.534161, (2, "train"): 10.158945,
    (3, "val"): 9.8784, (3, "train"): 9.815514, (4, "train"): 9.615191, (5, "train"): 9.313477, (6, "val"): 9.3472,
}


def test_default_recipe_losses_are_the_seeds(tmp_path, shakespeare):
    assert len(shakespeare.read_bytes()) == 1115394  # the whole of Tiny Shakespeare: the split decides the val loss
    log_dir = tmp_path / "log"
    run_cli(tiny_run_args(shakespeare, log_dir, max_steps=6, val_every=3, checkpoint_every=0), tmp_path)
    log = read_log(log_dir)
    assert log.keys() == SEED_LOG.keys()
    for key, expected in SEED_LOG.items():
        assert log[key] == pytest.approx(expected, abs=2e-6), key


def test_compile_and_bf16_run_on_cpu(tmp_path, shakespeare):
    log_dir = tmp_path / "log"
    run_cli(tiny_run_args(shakespeare, log_dir, max_steps=3, compile=1, dtype="bfloat16", val_every=3, checkpoint_every=0), tmp_path)
    log = read_log(log_dir)
    assert [(s, "train") in log for s in range(3)] == [True] * 3
    assert all(math.isfinite(v) for v in log.values())
    # compiled + checkpointed: the plain model's parameter names, which a plain GPT loads strictly
    ckpt = torch.load(log_dir / "model_00003.pt", weights_only=True)
    assert ckpt["model"].keys() == tg.GPT(tg.GPTConfig(**ckpt["config"])).state_dict().keys()


def bad_input_cases(tmp_path, shakespeare):
    (tmp_path / "empty").mkdir()
    return [
        (["--data", tmp_path / "nope"], "fineweb.py"),
        (["--data", tmp_path / "empty"], "fineweb.py"),
        (["--data", shakespeare, "--total_batch_size", 1000], "not a multiple"),
        (["--data", shakespeare, "--seq_len", 2048], "block_size"),
        (["--data", shakespeare, "--model", "gpt7"], "unknown --model"),
    ]


def test_bad_input_is_one_clear_line(tmp_path, shakespeare, capsys):
    base = ["--batch_size", 4, "--seq_len", 64, "--total_batch_size", 512, "--device", "cpu", "--compile", 0, "--log_dir", tmp_path / "log"]
    for args, expected in bad_input_cases(tmp_path, shakespeare):
        with pytest.raises(SystemExit) as e:
            tg.main([str(a) for a in base + args])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and err.count("\n") == 0, (args, err)
    # and once through a real process: no traceback
    p = run_cli(base + ["--data", tmp_path / "nope"], tmp_path, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "fineweb.py" in p.stderr


def test_refuses_to_overwrite_an_earlier_run(tmp_path, shakespeare):
    log_dir = tmp_path / "log"
    args = tiny_run_args(shakespeare, log_dir, max_steps=2, val_every=0, checkpoint_every=0)
    run_cli(args, tmp_path)
    p = run_cli(args, tmp_path, check=False)
    assert p.returncode == 2 and "--resume" in p.stderr and "Traceback" not in p.stderr
    assert (log_dir / "model_00002.pt").exists()
    run_cli(args + ["--overwrite"], tmp_path)


# -----------------------------------------------------------------------------
# DDP (torchrun, gloo) and exact resume


def torchrun(args, cwd, nproc=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "train_gpt2.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def wait_ok(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def descendants(pid):
    """pid and all its descendants (torchrun starts each worker in a session of its own)."""
    out = [pid]
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    out += descendants(int(child))
        except OSError:
            pass
    return out


def kill_after(proc, path, timeout=300):
    """SIGKILL the run, every process of it at once (as when the machine dies), as soon as `path` exists."""
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, f"run ended before {path} appeared:\n{proc.communicate()[0][-3000:]}"
        assert time.time() - t0 < timeout
        time.sleep(0.005)
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


RESUME_RUN = dict(max_steps=24, checkpoint_every=12, val_every=6, total_batch_size=1024, warmup_steps=4)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, shared_data):
    """Uninterrupted runs: one process with 4 accumulation steps, and torchrun x2 with 2."""
    tmp = tmp_path_factory.mktemp("ref")
    data = shared_data / "tinyshakespeare" / "input.txt"
    single = run_cli_popen(tiny_run_args(data, tmp / "single", **RESUME_RUN), tmp)
    wait_ok(single)
    ddp = torchrun(tiny_run_args(data, tmp / "ddp", **RESUME_RUN), tmp)
    wait_ok(ddp)
    return {"single": read_log(tmp / "single"), "ddp": read_log(tmp / "ddp"), "data": data}


def run_cli_popen(args, cwd):
    cmd = [sys.executable, str(ROOT / "train_gpt2.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_ddp_matches_single_process(reference_runs):
    single, ddp = reference_runs["single"], reference_runs["ddp"]
    for step in range(RESUME_RUN["max_steps"]):
        assert abs(single[(step, "train")] - ddp[(step, "train")]) < 1e-4, step


THREADS_AFTER_MAIN = """
import os, sys
import train_gpt2
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
train_gpt2.main(sys.argv[1:])
print(f"threads before {before} after {threads()}", flush=True)
"""


def test_ddp_exit_joins_gloo_threads(tmp_path, shared_data):
    """After main() under torchrun, the process group is gone and its gloo threads with it. A group kept alive lets a
    worker thread free the last collective's tensors while Python shuts down, which aborts the rank (a CI flake)."""
    script = tmp_path / "run_main.py"
    script.write_text(THREADS_AFTER_MAIN)
    args = tiny_run_args(shared_data / "tinyshakespeare" / "input.txt", tmp_path / "log", max_steps=2, val_every=1, checkpoint_every=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *map(str, args)]
    out = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    counts = re.findall(r"threads before (\d+) after (\d+)", out.stdout)
    assert len(counts) == 2, out.stdout[-3000:]
    for before, after in counts:
        assert int(after) <= int(before), out.stdout[-3000:]


def assert_resumed_equal(reference, log, from_step):
    steps = [k for k in reference if k[0] > from_step]
    assert steps
    for key in steps:
        assert log[key] == reference[key], key
    assert set(log) == set(reference)  # nothing missing, nothing logged twice


@pytest.mark.parametrize("launcher", ["single", "ddp"])
def test_sigkill_then_resume_is_exact(tmp_path, reference_runs, launcher):
    args = tiny_run_args(reference_runs["data"], tmp_path / "log", **RESUME_RUN)
    start = torchrun if launcher == "ddp" else run_cli_popen
    kill_after(start(args, tmp_path), tmp_path / "log" / "model_00012.pt")
    assert not (tmp_path / "log" / "model_00024.pt").exists()
    for path in (tmp_path / "log").glob("model_*.pt"):
        torch.load(path, weights_only=True)  # every checkpoint written loads safely
    wait_ok(start(args + ["--resume"], tmp_path))
    assert_resumed_equal(reference_runs[launcher], read_log(tmp_path / "log"), 12)
    tg.GPT.from_pretrained(tmp_path / "log" / "model_00024.pt")


def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path, reference_runs):
    log_dir = tmp_path / "log"
    args = tiny_run_args(reference_runs["data"], log_dir, **RESUME_RUN)
    proc = run_cli_popen(args, tmp_path)
    t0 = time.time()
    while not (log_dir / "log.txt").exists() or "3 train" not in (log_dir / "log.txt").read_text():
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out = wait_ok(proc)
    ckpts = tg.list_checkpoints(log_dir)
    assert len(ckpts) == 1 and 4 <= ckpts[0][0] < 24, out[-2000:]
    stopped_at = ckpts[0][0]
    wait_ok(run_cli_popen(args + ["--resume"], tmp_path))
    assert_resumed_equal(reference_runs["single"], read_log(log_dir), stopped_at)


def test_resume_refuses_changed_settings_and_skips_damaged_checkpoints(tmp_path, shakespeare):
    log_dir = tmp_path / "log"
    args = tiny_run_args(shakespeare, log_dir, max_steps=4, checkpoint_every=2, val_every=0)
    run_cli(args, tmp_path)
    assert [s for s, _ in tg.list_checkpoints(log_dir)] == [4, 2]
    p = run_cli(tiny_run_args(shakespeare, log_dir, max_steps=6, batch_size=8, val_every=0) + ["--resume"], tmp_path, check=False)
    assert p.returncode == 2 and "--batch_size 4 -> 8" in p.stderr and "Traceback" not in p.stderr
    # the newest checkpoint damaged (a disk error, a bad copy): resume falls back to the one before
    newest = log_dir / "model_00004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    (log_dir / ".model_00006.pt.tmp").write_bytes(b"half-written")  # what a writer killed mid-save leaves
    p = run_cli(tiny_run_args(shakespeare, log_dir, max_steps=6, checkpoint_every=2, val_every=0) + ["--resume"], tmp_path)
    assert "skipping" in p.stdout and "resuming from" in p.stdout and "model_00002.pt at step 2" in p.stdout
    assert sorted(read_log(log_dir)) == [(s, "train") for s in range(6)]


def test_resume_follows_moved_data_and_refuses_other_data(tmp_path, shakespeare):
    log_dir = tmp_path / "log"
    run_cli(tiny_run_args(shakespeare, log_dir, max_steps=2, checkpoint_every=2, val_every=0), tmp_path)
    other = tmp_path / "other.txt"
    other.write_text(shakespeare.read_text()[:300_000])
    p = run_cli(tiny_run_args(other, log_dir, max_steps=4, checkpoint_every=2, val_every=0) + ["--resume"], tmp_path, check=False)
    assert p.returncode == 2 and "not the data the checkpoint was trained on" in p.stderr and "Traceback" not in p.stderr
    # the same data at another path (a cluster job's scratch directory): resume goes on
    moved = tmp_path / "scratch" / "input.txt"
    moved.parent.mkdir()
    moved.write_bytes(shakespeare.read_bytes())
    p = run_cli(tiny_run_args(moved, log_dir, max_steps=4, checkpoint_every=2, val_every=0) + ["--resume"], tmp_path)
    assert "the data moved" in p.stdout and "at step 2" in p.stdout
    assert sorted(read_log(log_dir)) == [(s, "train") for s in range(4)]


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path, shakespeare):
    # d8 with its optimizer state is ~1 GB per checkpoint: the write takes long enough to be caught mid-way
    log_dir = tmp_path / "log"
    args = tiny_run_args(shakespeare, log_dir, model="d8", max_steps=3, checkpoint_every=1, val_every=0, batch_size=2, total_batch_size=128)
    proc = run_cli_popen(args, tmp_path)
    kill_after(proc, log_dir / ".model_00002.pt.tmp")
    assert (log_dir / "model_00001.pt").exists()
    assert not (log_dir / "model_00002.pt").exists()
    torch.load(log_dir / "model_00001.pt", weights_only=True)
    p = run_cli(args + ["--resume"], tmp_path)
    assert "model_00001.pt at step 1" in p.stdout


def test_nan_loss_stops_without_checkpoint(tmp_path, shakespeare):
    log_dir = tmp_path / "log"
    p = run_cli(tiny_run_args(shakespeare, log_dir, max_lr=1e6, max_steps=20, checkpoint_every=1, val_every=0), tmp_path, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "step " in p.stderr and "nan" in p.stderr.lower()
    for _, path in tg.list_checkpoints(log_dir):
        ckpt = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_log_truncation_and_pruning(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("0 val 10.0\n0 train 10.5\n1 train 9.0\n2 val 8.0\n2 hella 0.25\n2 train 8.5\n3 train 8.0\n")
    tg.truncate_log(str(log), 2)
    assert log.read_text() == "0 val 10.0\n0 train 10.5\n1 train 9.0\n2 val 8.0\n2 hella 0.25\n"
    for s in (1, 2, 3, 4):
        (tmp_path / f"model_{s:05d}.pt").write_bytes(b"x")
    (tmp_path / "model_00001.pt.keep").touch()
    tg.prune_checkpoints(str(tmp_path), 2)
    assert [s for s, _ in tg.list_checkpoints(str(tmp_path))] == [4, 3, 1]


def test_logits_at_selects_positions():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 50257, (3, 20))
    at = torch.rand(3, 20) < 0.3
    with torch.no_grad():
        full, _ = model(idx)
        some = model.logits_at(idx, at)
    assert some.shape == (int(at.sum()), 50257)
    assert torch.allclose(some, full[at], atol=1e-5)


# -----------------------------------------------------------------------------
# Muon, the WSD schedule and --recipe


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (64, 192)])
def test_newton_schulz_is_near_orthogonal(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape) * 1e-3  # the scale of G does not matter
    X = tg.newton_schulz(G)
    assert X.dtype == torch.bfloat16 and X.shape == G.shape
    s = torch.linalg.svdvals(X.float())
    assert 0.6 < s.min() and s.max() < 1.2  # 5 iterations of these coefficients: ~0.68..1.15, not exactly 1
    # the singular vectors are G's: X ~ U V^T
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(X.float().flatten(), (U @ Vh).flatten(), dim=0) > 0.98


def test_muon_step_matches_torch_optim_muon():
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon is in torch >= 2.9")
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(48, 16)), torch.nn.Parameter(torch.randn(48, 16))
    theirs.data.copy_(ours.data)
    start = ours.detach().clone()
    opt_ours = tg.Muon([ours], lr=0.02, momentum=0.95, weight_decay=0.01)
    opt_theirs = torch.optim.Muon([theirs], lr=0.02, momentum=0.95, weight_decay=0.01)  # same scaling ("original")
    for _ in range(3):
        g = torch.randn(48, 16)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    # the same update up to bf16 rounding inside Newton-Schulz (torch fuses the multiply-adds)
    assert ((ours - theirs).norm() / (theirs - start).norm()).item() < 0.05
    assert torch.equal(opt_ours.state[ours]["momentum_buffer"], opt_theirs.state[theirs]["momentum_buffer"])


def test_make_optimizer_muon_groups_and_schedule():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    args = tg.parse_args(["--optimizer", "muon", "--muon_lr", "0.03", "--embed_lr", "1e-3", "--schedule", "wsd", "--max_steps", "100", "--warmup_steps", "10"])
    opt = tg.make_optimizer(model, args, "cpu")
    embed, gains, muon = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon["params"]) == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
    assert sorted(names[id(p)] for p in embed["params"]) == ["transformer.wpe.weight", "transformer.wte.weight"]  # wte = lm_head
    assert all(p.dim() == 1 for p in gains["params"]) and gains["weight_decay"] == 0.0 and embed["weight_decay"] == 0.1
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    # each group between its own peak and the same final fraction of it
    assert [(g["initial_lr"], g["min_lr"]) for g in opt.param_groups] == [(1e-3, pytest.approx(1e-4)), (6e-4, 6e-5), (0.03, pytest.approx(0.003))]
    assert tg.set_lr(opt, 50, args) == 1e-3 and muon["lr"] == 0.03 and gains["lr"] == 6e-4
    tg.set_lr(opt, 90, args)  # halfway through the decay (the last 20 steps)
    assert muon["lr"] == pytest.approx(0.0165) and gains["lr"] == pytest.approx(3.3e-4)
    # a resumed run keeps its own flags' schedule (as with --max_steps), not the one saved in the checkpoint
    again = tg.make_optimizer(model, tg.parse_args(["--optimizer", "muon", "--muon_lr", "0.05"]), "cpu")
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[2]["initial_lr"] == 0.05 and again.param_groups[0]["initial_lr"] == 6e-4
    # the default recipe: the seed's AdamW, every group at --max_lr
    default = tg.parse_args([])
    opt = tg.make_optimizer(model, default, "cpu")
    assert isinstance(opt, torch.optim.AdamW) and tg.set_lr(opt, 1000, default) == tg.get_lr(1000, 6e-4, 6e-5, 715, 19073)


def test_wsd_schedule():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100, schedule="wsd", decay_frac=0.2)
    assert tg.get_lr(0, **kw) == pytest.approx(0.1)
    assert [tg.get_lr(s, **kw) for s in (9, 10, 50, 80)] == [1.0] * 4  # warmup done, constant until step 80
    assert tg.get_lr(90, **kw) == pytest.approx(0.55)
    assert tg.get_lr(99, **kw) == pytest.approx(1.0 - 0.9 * 19 / 20)
    assert tg.get_lr(100, **kw) == tg.get_lr(500, **kw) == 0.1
    lrs = [tg.get_lr(s, **kw) for s in range(80, 101)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_muon_under_grad_scaler_equals_unscaled_step():
    """GradScaler.unscale_ / step work on the Muon + AdamW pair: a scaled loss gives the unscaled update."""
    models = []
    for scale in (None, 1024.0):
        torch.manual_seed(0)
        model = tg.GPT(tg.GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=32))
        opt = tg.make_optimizer(model, tg.parse_args(["--optimizer", "muon"]), "cpu")
        scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            opt.zero_grad()
            scaler.scale(model(x, x)[1]).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.allclose(a, b, atol=1e-6)


def test_recipe_preset_and_explicit_flags_win():
    fast = tg.parse_args(["--recipe", "fast"])
    assert (fast.optimizer, fast.schedule) == ("muon", "wsd")
    for name, value in tg.RECIPES["fast"].items():
        assert getattr(fast, name, value) == value  # "arch" only where the script has --arch
    # an explicit flag wins, even when it equals the flag's default
    mixed = tg.parse_args(["--recipe", "fast", "--optimizer", "adamw", "--muon_lr", "0.5", "--schedule=cosine"])
    assert (mixed.optimizer, mixed.muon_lr, mixed.schedule, mixed.decay_frac) == ("adamw", 0.5, "cosine", tg.RECIPES["fast"]["decay_frac"])
    assert vars(tg.parse_args([])) == vars(tg.parse_args(["--recipe", "gpt2"]))  # gpt2 = the defaults


MUON_RUN = dict(recipe="fast", max_steps=8, checkpoint_every=4, val_every=4, total_batch_size=1024, warmup_steps=2, keep_checkpoints=3)


def test_fast_recipe_learns_ddp_matches_and_resumes_exactly(tmp_path, shakespeare):
    """--recipe fast (Muon, WSD): the loss drops; torchrun x2 = one process with twice the accumulation; resuming
    from the step-4 checkpoint reproduces steps 4..8 exactly; a resume with another optimizer is refused."""
    single = run_cli_popen(tiny_run_args(shakespeare, tmp_path / "single", **MUON_RUN), tmp_path)
    wait_ok(single)
    ddp = torchrun(tiny_run_args(shakespeare, tmp_path / "ddp", **MUON_RUN), tmp_path)
    wait_ok(ddp)
    ref, log_ddp = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    assert ref[(7, "train")] < ref[(0, "train")] - 1.5 and ref[(8, "val")] < ref[(0, "val")] - 1.5
    for step in range(8):
        assert abs(ref[(step, "train")] - log_ddp[(step, "train")]) < 1e-4, step
    ckpt = torch.load(tmp_path / "single" / "model_00004.pt", weights_only=True)
    assert ckpt["args"]["optimizer"] == "muon" and len(ckpt["optimizer"]["optimizers"][1]["state"]) == 2 * 4  # momentum buffers
    args = tiny_run_args(shakespeare, tmp_path / "single", **MUON_RUN)
    wait_ok(run_cli_popen(args + ["--resume", tmp_path / "single" / "model_00004.pt"], tmp_path))
    assert_resumed_equal(ref, read_log(tmp_path / "single"), 4)
    p = run_cli(args + ["--resume", "--optimizer", "adamw"], tmp_path, check=False)
    assert p.returncode == 2 and "--optimizer muon -> adamw" in p.stderr and "Traceback" not in p.stderr
