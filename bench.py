"""
Benchmarks for train_gpt2.py (examples and numbers: docs/performance.md). Every training step is train_step, the
step train() runs. Each comparison runs its variants interleaved (A, B, A, B, ...) and reports medians, so that load
from other programs hits all alike. A mode is one function `bench_NAME(args)` in MODES; its docstring, its help.
"""

import argparse
import atexit
import contextlib
import copy
import io
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from importlib.util import find_spec

import numpy as np
import torch

import checks
import common
import sharding
import train_gpt2
from checks import batch_size_arg, positive_int
from common import GPT2_VOCAB, UsageError, autocast_context, pick_device
from train_gpt2 import GPT, DataLoaderLite, model_config

HERE = os.path.dirname(os.path.abspath(__file__))
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # dtype names in printed lines

# -----------------------------------------------------------------------------
# Measuring


def timed(fn, device_type):
    """(seconds, result) of fn(), up to when the GPU has finished its work (CUDA kernels run asynchronously)."""
    sync = torch.cuda.synchronize if device_type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - t0, result


def interleaved(fns, rounds, after_round=None):
    """{name: [each round's result]} of the callables in fns, run A, B, A, B, ...; after_round(round, results)."""
    results = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            results[name].append(fn())
        if after_round:
            after_round(r, results)
    return results


def run_checked(cmd):
    """cmd's stdout; UsageError, after the end of its output, if it fails."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode:
        print(p.stdout[-3000:] + p.stderr[-3000:], file=sys.stderr)
        raise UsageError(f"{shlex.join(map(str, cmd))} failed (exit {p.returncode}); its output is above")
    return p.stdout


def peak_rss_bytes():
    """This process's peak resident memory: on Linux VmHWM, since ru_maxrss keeps the parent's peak across exec."""
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


def cpu_matmul_peak(dtype, n=2048, reps=3):
    """FLOP/s of the best of `reps` (n, n) @ (n, n) matmuls: the rate the CPU's matmul library reaches here."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b, "cpu")[0] for _ in range(reps))


def device_description(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    name = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads"


def warn_if_busy():
    # other programs slow CPU timings far more than their share: OpenMP threads wait for each other at every step
    load = os.getloadavg()[0]
    if load > 0.5 * os.cpu_count():
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: CPU timings will be slow and noisy "
              f"(ratios of interleaved variants hold up better than absolute numbers)")


def gib(n):
    return f"{n / 2**30:.2f} GiB"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def setup(args):
    """(DistContext, autocast dtype) with the device set up as train() sets it (TF32, CPU allocator, seed)."""
    ctx = common.setup_distributed(args.device)
    return ctx, common.setup_device(args.dtype, 1337, ctx)


def train_flags(args, ctx, data, **changes):
    """train_gpt2.py's flags for one micro-batch of args' shape a step, on `data` (a directory of shards): no
    evaluations, no checkpoints; `changes` (flag=value) on top."""
    flags = dict(data=data, model=args.model, vocab_size=args.vocab_size, batch_size=args.batch_size,
                 seq_len=args.seq_len, total_batch_size=args.batch_size * args.seq_len * ctx.world_size,
                 dtype=args.dtype, compile=args.compile, device=ctx.device, val_every=0, hellaswag_every=0,
                 sample_every=0, loss_chunk_size=args.loss_chunk_size, max_steps=1, log_dir=data) | changes
    argv = [f"--{k}" if v is True else f"--{k}={v}" for k, v in flags.items() if v is not None and v is not False]
    return train_gpt2.parse_args(argv)


def write_shards(root, shards, tokens):
    """Paths of `shards` .npy train shards of random tokens in root (kept when already there at that size)."""
    rng, paths = np.random.default_rng(0), []
    for i in range(shards):
        path = os.path.join(root, f"bench_train_{i:06d}.npy")
        if not os.path.exists(path) or np.load(path, mmap_mode="r").shape != (tokens,):
            np.save(path, rng.integers(0, GPT2_VOCAB, tokens, dtype=np.uint16))
        paths.append(path)
    return paths


def random_shards(args, ctx):
    """A directory (removed at exit) with a train shard of random tokens, 8 micro-batches of every rank: the
    benchmark times the model, not the data."""
    root = tempfile.mkdtemp(prefix="bench_data_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    batch_tokens = args.batch_size * args.seq_len * ctx.world_size if args.batch_size != "auto" else 2**19
    write_shards(root, 1, 8 * batch_tokens + 1)
    return root


# -----------------------------------------------------------------------------
# Training steps: ours, transformers' GPT2LMHeadModel, and the ladder


class HFLoss(torch.nn.Module):
    """transformers' GPT2LMHeadModel in config's shape (GPT-2's vocab, no dropout) behind our forward's signature."""

    softcap = None  # GPT-2's head, as far as the loss path is concerned

    def __init__(self, config):
        super().__init__()
        self.config = config
        from transformers import GPT2Config, GPT2LMHeadModel

        shape = dict(n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head)
        self.hf = GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **shape))
        self.hf.loss_type = "ForCausalLM"  # its default; saying so silences a warning

    def forward(self, idx, targets):
        return None, self.hf(input_ids=idx, labels=idx, use_cache=False).loss  # it shifts the labels itself


def own_memory(resident, before, peak, after):
    """(a variant's own peak of a step, what it holds after): every variant lives in this process, so the memory
    allocated before its step, less what it held itself (resident), is the others' weights and optimizer states,
    which neither its peak nor what it holds after includes."""
    others = before - resident
    return peak - others, after - others


@dataclass
class Variant:
    """One way to train: built as train() builds it, stepped with train_step (lr 6e-4, one micro-batch, clip 1.0)."""
    name: str
    dtype: torch.dtype
    compile: bool
    plain: bool = False  # torch's defaults: no TF32, its default AdamW (a loop over tensors on CPU, foreach on CUDA)
    loss_chunk_size: int = None  # ours: None = the device's default, 0 = full logits
    hf: bool = False
    fsdp: bool = False
    losses: list = field(default_factory=list)
    peak_mem: int = 0  # the peak GPU memory of its steps so far, its own: the other variants' subtracted
    resident: int = 0  # the GPU memory it holds between steps (weights, gradients, optimizer state)

    def build(self, args, ctx, data):
        """The run train_gpt2.build_run builds from this variant's flags (the HF model given to it instead of ours)."""
        dtype = str(self.dtype).replace("torch.", "")
        flags = train_flags(args, ctx, data, dtype=dtype, compile=int(self.compile), fsdp=self.fsdp,
                            loss_chunk_size=self.loss_chunk_size)
        config = model_config(args.model, args.vocab_size)
        torch.manual_seed(1337)  # the HF model is built before build_run seeds: the same init in every round
        # GPT's optimizer (decay on dim >= 2) fits any module, so both models get the same one
        cuda = ctx.device_type == "cuda"
        before = torch.cuda.memory_allocated(ctx.device) if cuda else 0  # the variants built before this one
        with contextlib.redirect_stdout(io.StringIO()):  # build_run's lines about the data: not the benchmark's
            self.run, _ = train_gpt2.build_run(flags, ctx, model=HFLoss(config) if self.hf else None)
        self.resident = torch.cuda.memory_allocated(ctx.device) - before if cuda else 0
        self.flops_config = replace(config, vocab_size=GPT2_VOCAB) if self.hf else config
        for group in self.run.optimizer.param_groups if self.plain else []:
            group["fused"] = False

    def step(self):
        """The step's seconds; its loss goes to self.losses."""
        ctx = self.run.ctx
        if ctx.device_type == "cuda":  # train() turns TF32 on; torch's default is off
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not self.plain
            torch.cuda.reset_peak_memory_stats(ctx.device)
            before = torch.cuda.memory_allocated(ctx.device)
        dt, (loss, _) = timed(lambda: train_gpt2.train_step(self.run), ctx.device_type)
        self.losses.append(loss)
        if ctx.device_type == "cuda":
            peak, self.resident = own_memory(self.resident, before, torch.cuda.max_memory_allocated(ctx.device),
                                             torch.cuda.memory_allocated(ctx.device))
            self.peak_mem = max(self.peak_mem, peak)
        return dt


def train_variants(args, dtype):
    d, c, chunk, f32 = SHORT[dtype], bool(args.compile), args.loss_chunk_size, torch.float32  # chunk None: default
    variants = [Variant(f"ours: {d}{', compile' if c else ''}, fused AdamW, chunked loss", dtype, c,
                        loss_chunk_size=chunk)]
    if args.compare == "hf":
        hf = "hf GPT2LMHeadModel: "
        variants += [Variant(hf + "fp32, default AdamW", f32, False, plain=True, hf=True),
                     Variant(hf + f"{d}, fused AdamW, no compile (transformers' default)", dtype, False, hf=True),
                     Variant(hf + f"{d}, compile, fused AdamW (all our settings)", dtype, True, hf=True)]
    elif args.compare == "ladder":  # one change at a time, from plain fp32 to our defaults, then build-nanogpt's setup
        variants = [
            Variant("fp32, default AdamW, full logits", f32, False, plain=True, loss_chunk_size=0),
            Variant("+ fused AdamW", f32, False, loss_chunk_size=0),
            Variant("+ chunked loss", f32, False, loss_chunk_size=chunk),
            Variant(f"+ {d} autocast", dtype, False, loss_chunk_size=chunk),
            Variant("+ compile (our defaults)", dtype, True, loss_chunk_size=chunk),
            Variant(f"{d}, compile, full logits F.cross_entropy (build-nanogpt)", dtype, True, loss_chunk_size=0),
        ]
    return [v for v in variants if c or not v.compile]  # --compile 0: the variants without compile


def mfu_text(v, flops, step_s, device, cpu_peaks):
    if device.startswith("cuda"):
        peak, what = common.gpu_peak_flops(torch.cuda.get_device_name(device)), "datasheet bf16 peak"
    else:
        peak, what = median(cpu_peaks[v.dtype]), f"measured {SHORT[v.dtype]} matmul peak"
    return f"MFU {100 * flops / step_s / peak:.1f}% of {what} ({peak / 1e12:.3g} TFLOP/s)" if peak else "MFU n/a"


def bench_train(args):
    """training steps: tokens/s, MFU and peak memory; --compare hf or ladder"""
    t_start = time.time()
    ctx, dtype = setup(args)
    T, data = args.seq_len, random_shards(args, ctx)
    if args.batch_size == "auto":  # train()'s choice, as for gpt2's 0.5M-token batch
        args.batch_size = train_gpt2.build_run(train_flags(args, ctx, data, total_batch_size=2**19), ctx)[0].batch_size
    with torch.device("meta"):  # counted without memory
        params, B = GPT(model_config(args.model, args.vocab_size)).num_params(), args.batch_size
    print(f"bench train: --model {args.model} ({params / 1e6:.2f}M parameters), B={B}, T={T} "
          f"({B * T} tokens/step), device {ctx.device} ({device_description(ctx.device)}), torch {torch.__version__}")
    if args.compare == "hf":
        import transformers
        print(f"transformers {transformers.__version__}: GPT2LMHeadModel with its default attention (sdpa), dropout "
              f"0, vocab {GPT2_VOCAB}, labels = inputs (it shifts them itself), use_cache=False")
    variants, cpu = train_variants(args, dtype), ctx.device_type == "cpu"
    for v in variants:  # build and warm up: the first step compiles and allocates
        v.build(args, ctx, data)
        first = [v.step() for _ in range(args.warmup)][0]
        print(f"  built and warmed up {v.name}: first step {first:.1f}s", flush=True)
    # on CPU the matmul peak is measured in every round, under the same load as the steps
    peaks = {d: partial(cpu_matmul_peak, d) for d in dict.fromkeys(v.dtype for v in variants)} if cpu else {}

    def each_round(r, times):
        print(f"  round {r + 1}/{args.steps}: " + ", ".join(f"{times[v.name][-1] * 1000:.0f}ms" for v in variants),
              flush=True)

    results = interleaved({v.name: v.step for v in variants} | peaks, args.steps, each_round)
    if cpu:
        print("CPU matmul peak (2048^3, best of 3 per round, median): "
              + ", ".join(f"{SHORT[d]} {median(results[d]) / 1e9:.0f} GFLOP/s" for d in peaks))
    for v in variants:
        step_s, flops = median(results[v.name]), common.flops_per_token(v.flops_config, T) * B * T
        mem = "" if cpu else f" | peak mem {gib(v.peak_mem)}"
        print(f"{v.name}\n    {B * T / step_s:9.1f} tok/s | {step_s * 1000:.1f} ms/step | {flops / step_s / 1e9:.1f} "
              f"GFLOP/s | {mfu_text(v, flops, step_s, ctx.device, results)}{mem} | loss {v.losses[-1]:.4f}")
    if cpu:
        print(f"peak RSS of this process (all variants together): {gib(peak_rss_bytes())}")
    print(f"{args.steps} timed steps per variant after {args.warmup} warm-up; total time {time.time() - t_start:.1f}s")

    def speedup(fast, slow):  # the median of each round's ratio: a slow spell hits both sides of a round alike
        return median([b / a for a, b in zip(results[fast.name], results[slow.name])])

    if args.compare == "hf":
        ours, hf = variants[0], variants[1:]
        print(f"ratio vs hf {SHORT[dtype]} + fused AdamW without torch.compile: {speedup(ours, hf[1]):.2f}")
        print(f"ratio vs hf fp32: {speedup(ours, hf[0]):.2f}  vs hf same settings: {speedup(ours, hf[-1]):.2f}")
    elif args.compare == "ladder":
        print("speed-up over the first: " + ", ".join(f"{speedup(v, variants[0]):.2f}x" for v in variants))


# -----------------------------------------------------------------------------
# Peak memory: full logits vs chunked loss, each in a fresh process; memory per rank: DDP vs FSDP, under torchrun


def memory_worker(out):
    """One process of fresh_processes: args.steps training steps (from the second on, AdamW's state exists), args
    from out.args.json; its peak memory, state bytes, losses and step times to out.RANK."""
    with open(f"{out}.args.json") as f:
        args = argparse.Namespace(**json.load(f))
    ctx, dtype = setup(args)
    base_rss, cuda = peak_rss_bytes(), ctx.device_type == "cuda"
    v = Variant("", dtype, bool(args.compile), loss_chunk_size=args.loss_chunk_size, fsdp=args.fsdp)
    v.build(args, ctx, random_shards(args, ctx))
    before = torch.cuda.memory_allocated(ctx.device) if cuda else peak_rss_bytes()
    times = [v.step() for _ in range(args.steps)]
    result = dict(sharding.state_bytes_per_rank(v.run.train_model, v.run.optimizer), cuda=cuda, base_rss=base_rss,
                  peak_rss=peak_rss_bytes(), before=before, peak=v.peak_mem if cuda else peak_rss_bytes(),
                  losses=v.losses, times=times, dtype=SHORT[dtype])
    with open(f"{out}.{ctx.rank}", "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fresh_processes(args, procs, **changes):
    """Each rank's memory_worker result, from fresh processes (peak RSS never goes down): one, or procs (torchrun)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        with open(f"{out}.args.json", "w") as f:
            json.dump(vars(args) | changes, f)
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
        run_checked([sys.executable, *launch, os.path.abspath(__file__), f"--_worker_out={out}"])
        return [json.load(open(f"{out}.{rank}")) for rank in range(procs)]


def bench_memory_procs(args):
    if args.device == "auto":  # one GPU per rank if there are enough, else CPU processes with gloo
        args.device = "cuda" if torch.cuda.device_count() >= args.procs else "cpu"
    variants = {"DDP": False, "FSDP": True} if args.fsdp else {"DDP": False}
    results = interleaved({n: partial(fresh_processes, args, args.procs, fsdp=f) for n, f in variants.items()},
                          args.repeats)
    print(f"bench memory per rank: --model {args.model}, {args.procs} ranks on {args.device}, B={args.batch_size}, "
          f"T={args.seq_len}, after {args.steps} training steps, --dtype {args.dtype}; median of {args.repeats} "
          f"run(s) per variant, interleaved, max over ranks (RSS varies with the machine's load)")
    rows = {}
    for name, runs in results.items():
        per_rank = lambda f, runs=runs: median([max(f(r) for r in ranks) for ranks in runs])  # noqa: E731
        row = {k: per_rank(lambda r: r[k]) for k in ("parameters", "gradients", "optimizer")}
        rows[name] = row | {"sharded total": sum(row.values()), "peak RSS": per_rank(lambda r: r["peak_rss"]),
                            "RSS over start": per_rank(lambda r: r["peak_rss"] - r["base_rss"])}
        if runs[0][0]["cuda"]:
            rows[name]["peak CUDA"] = per_rank(lambda r: r["peak"])
    print(f"{'MiB per rank':<12}" + "".join(f"{c:>16}" for c in rows["DDP"]))
    for name, row in rows.items():
        print(f"{name:<12}" + "".join(f"{v / 2**20:>16.1f}" for v in row.values()))
    if args.fsdp:
        print(f"{'FSDP / DDP':<12}" + "".join(f"{rows['FSDP'][c] / rows['DDP'][c]:>16.3f}" for c in rows["DDP"]))


def bench_memory(args):
    """peak memory of training steps: full logits vs the chunked loss, each in a fresh process; with --procs N:
    memory per rank of DDP (and FSDP with --fsdp), each under torchrun"""
    if args.procs > 1:
        return bench_memory_procs(args)
    t_start = time.time()
    what = "max_memory_allocated" if pick_device(args.device).startswith("cuda") else "peak RSS"
    print(f"bench memory: --model {args.model}, B={args.batch_size}, T={args.seq_len}, {args.steps} training steps in "
          f"a fresh process per variant, {args.repeats} interleaved rounds, compile {bool(args.compile)}")
    chunk = args.loss_chunk_size  # None: the device's default
    variants = {"full logits (loss_chunk_size=0)": 0, f"chunked loss (loss_chunk_size={chunk or 'default'})": chunk}

    def run(name, chunk_size):
        r = fresh_processes(args, 1, loss_chunk_size=chunk_size)[0]
        print(f"{name:42s} {r['dtype']}: {what} {gib(r['peak'])} (before the steps {gib(r['before'])}), losses "
              f"{', '.join(f'{x:.6f}' for x in r['losses'])}, step times {', '.join(f'{t:.1f}s' for t in r['times'])}",
              flush=True)
        return r

    # peak RSS varies from run to run with how the heap fragments: take medians
    full, chunked = interleaved({n: partial(run, n, c) for n, c in variants.items()}, args.repeats).values()
    peak = [median([r["peak"] for r in rs]) for rs in (full, chunked)]
    own = [median([r["peak"] - r["before"] for r in rs]) for rs in (full, chunked)]
    diff = max(abs(a - b) for f, c in zip(full, chunked) for a, b in zip(f["losses"], c["losses"]))
    print(f"median {what}: full logits {gib(peak[0])}, chunked loss {gib(peak[1])}")
    print(f"peak memory with the chunked loss: {100 * (peak[1] / peak[0] - 1):+.1f}% (the steps' own memory above "
          f"the model: {100 * (own[1] / max(1, own[0]) - 1):+.1f}%); largest loss difference {diff:.2e}; "
          f"total time {time.time() - t_start:.1f}s")


# -----------------------------------------------------------------------------
# Sampling: KV cache vs a full forward per new token


def decode(model, prompt, n, dtype, cache):
    """n greedy tokens after prompt: model.generate (KV cache), or the whole sequence through the model per token."""
    with torch.no_grad(), autocast_context(prompt.device.type, dtype):
        if cache:
            return model.generate(prompt, n, top_k=1)
        idx = prompt
        for _ in range(n):
            idx = torch.cat([idx, model(idx)[0][:, -1, :GPT2_VOCAB].argmax(-1, keepdim=True)], dim=1)
        return idx


@torch.no_grad()
def token_check(model, cached, uncached, dtype, prompt_len):
    """Whether the decodes with and without the cache agree, as text; where they differ, a near-tie or a real
    mismatch: the float64 logits' gap between the two tokens vs the error of dtype's logits there."""
    differ = (cached != uncached).any(1).nonzero().flatten().tolist()
    if not differ:
        return "identical"
    exact, rows = copy.deepcopy(model).double(), []
    for i in differ:
        p = int((cached[i] != uncached[i]).nonzero()[0])
        prefix = uncached[i : i + 1, :p]
        ref = exact(prefix)[0][0, -1, :GPT2_VOCAB]
        with autocast_context(prefix.device.type, dtype):
            err = (model(prefix)[0][0, -1, :GPT2_VOCAB].double() - ref).abs().max().item()
        rows.append(((ref[cached[i, p]] - ref[uncached[i, p]]).abs().item(), err, i, p - prompt_len))
    gap, err, i, p = max(rows, key=lambda r: r[0] / max(r[1], 1e-30))
    return (f"{len(rows)} of {len(cached)} sequence(s) differ; the worst: sequence {i} from new token {p}, where the "
            f"two tokens' float64 logits are {gap:.2g} apart and {SHORT[dtype]}'s logits up to {err:.2g} off: "
            + ("near-ties that rounding flips" if gap <= 2 * err else "a real mismatch"))


def bench_sample(args):
    """sampling tokens/s: KV cache (model.generate) vs a full forward per token"""
    ctx, dtype = setup(args)
    model = GPT(model_config(args.model, args.vocab_size)).to(ctx.device).eval()
    B, n = args.batch_size, args.max_new_tokens
    print(f"bench sample: --model {args.model} ({model.num_params() / 1e6:.2f}M parameters), {B} sequence(s) x {n} "
          f"new tokens after an 8-token prompt, greedy, {SHORT[dtype]}, device {ctx.device} "
          f"({device_description(ctx.device)}), {args.repeats} interleaved repeats")
    prompt = [[15496, 11, 314, 1101, 257, 3303, 2746, 11]] * B  # "Hello, I'm a language model,"
    prompt = torch.tensor(prompt, device=ctx.device)

    def check(dt):  # both decodes (also the warm-up), compared
        return token_check(model, *(decode(model, prompt, n, dt, cache) for cache in (True, False)), dt, len(prompt[0]))

    same = check(dtype)
    variants = {"with KV cache (model.generate)": True, "without cache (a full forward per token)": False}
    times = interleaved({name: lambda c=c: timed(partial(decode, model, prompt, n, dtype, c), ctx.device_type)[0]
                         for name, c in variants.items()}, args.repeats)
    for name, ts in times.items():
        all_s = ", ".join(f"{x:.2f}" for x in ts)
        print(f"{name:42s} {B * n / median(ts):9.1f} tok/s | {median(ts):.3f}s (all: {all_s})")
    print(f"tokens with and without the cache, {SHORT[dtype]}: {same}")
    if dtype != torch.float32:  # the same check without autocast, and on GPUs without TF32: exact up to fp32 rounding
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        print(f"tokens with and without the cache, fp32 (no autocast, no TF32): {check(torch.float32)}")
    cached, uncached = (median(ts) for ts in times.values())
    print(f"sampling speed-up with the KV cache: {uncached / cached:.2f}x")


# -----------------------------------------------------------------------------
# Data loading: DataLoaderLite in order vs --shuffle, pages from the disk vs cached


def cold_then_warm(loader, paths, args):
    """(from the disk, from cached pages): mean seconds of next_batch over the same args.batches batches."""
    def mean_time():
        total = 0.0
        for _ in range(args.batches):
            total += timed(loader.next_batch, "cpu")[0]
            time.sleep(args.gap_ms / 1000)  # the micro-step, during which the OS reads ahead
        return total / args.batches

    state = loader.state_dict()
    for path in paths:  # out of the page cache: read from the disk, as a fresh run's are
        with open(path, "rb") as f:
            os.fsync(f.fileno())  # dirty pages cannot be dropped
            if hasattr(os, "posix_fadvise"):  # not on macOS: there 'cold' is cached too
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    cold = mean_time()
    loader.load_state_dict(state)  # the same batches again, now from cached pages
    return cold, mean_time()


def bench_data(args):
    """DataLoaderLite's time per batch: in order vs --shuffle, from the disk (pages evicted) vs cached, as a share
    of a micro-step on an H100"""
    B, T = args.batch_size, args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or tmp
        os.makedirs(root, exist_ok=True)
        paths = write_shards(root, args.shards, args.shard_tokens)
        loaders = {"in order": DataLoaderLite(B, T, split="train", data_root=root),
                   "--shuffle": DataLoaderLite(B, T, split="train", data_root=root, shuffle=True, seed=1337)}
        runs = interleaved({n: partial(cold_then_warm, lo, paths, args) for n, lo in loaders.items()}, args.repeats)
    times = {(name, cache): [r[i] for r in rs] for name, rs in runs.items() for i, cache in enumerate(("cold", "warm"))}
    flops = common.flops_per_token(model_config(args.model, args.vocab_size), T) * B * T
    h100 = flops / common.gpu_peak_flops("H100")  # the least a micro-step takes on an H100 SXM: 100% MFU, bf16 peak
    print(f"bench data: DataLoaderLite B={B}, T={T} ({B * T * 2 / 1024:g} KiB a batch) over {args.shards} shards of "
          f"{args.shard_tokens:,} tokens in {args.data_dir or 'a temporary directory'}; {args.repeats} interleaved "
          f"repeats of {args.batches} batches, {args.gap_ms:g} ms apart")
    print(f"{'':26s} {'median':>10s} {'min':>10s} {'max':>10s}   share of a micro-step on an H100")
    for (name, cache), ts in times.items():
        print(f"{name + ', ' + cache + ' pages':26s} {median(ts) * 1e6:8.1f}us {min(ts) * 1e6:8.1f}us "
              f"{max(ts) * 1e6:8.1f}us   {100 * median(ts) / h100:.3g}%")
    for cache in ("cold", "warm"):
        ratio = median(times[("--shuffle", cache)]) / median(times[("in order", cache)])
        print(f"--shuffle / in order, {cache}: {ratio:.2f}x")
    print(f"a --model {args.model} micro-step of {B} x {T} takes at least {h100 * 1000:.3g} ms on an H100 SXM: "
          f"{flops / 1e12:.3g} TFLOP at its {common.gpu_peak_flops('H100') / 1e12:.0f} TFLOP/s bf16 datasheet peak")


# -----------------------------------------------------------------------------
# Recipes: tokens to reach the seed recipe's val loss (train_gpt2.py --recipe / --optimizer / --schedule / --arch)

# name -> train_gpt2.py flags on top of RECIPE_COMMON; "gpt2" (the seed's recipe) sets the target
BENCH_RECIPES = {"gpt2": ["--recipe", "gpt2"], "gpt2+muon": ["--optimizer", "muon"], "fast": ["--recipe", "fast"]}
# a short run on CPU: warmup 5, max lr 2e-3 (tuned for d4's AdamW), val on 8192 held-out tokens every 5 steps
RECIPE_COMMON = ["--warmup_steps", 5, "--max_lr", 2e-3, "--min_lr", 2e-4, "--val_every", 5, "--val_tokens", 8192,
                 "--hellaswag_every", 0, "--sample_every", 0, "--checkpoint_every", 0, "--compile", 0, "--overwrite"]


def steps_to_reach(curve, target):
    """The (fractional) step at which the val curve first reaches target, linear between evaluations; None if never."""
    for (s0, v0), (s1, v1) in zip([curve[0]] + curve, curve):
        if v1 <= target:
            return s1 if v0 == v1 else s0 + (v0 - target) / (v0 - v1) * (s1 - s0)
    return None


def recipe_run(common, name, flags, log_root):
    """(val curve, seconds of each step after 2 to warm up) of one train_gpt2.py run, which logs to log_root/name."""
    log_dir = os.path.join(log_root, name)
    out = run_checked([sys.executable, os.path.join(HERE, "train_gpt2.py"), *common, "--log_dir", log_dir, *flags])
    with open(os.path.join(log_dir, "log.txt")) as f:
        curve = [(int(step), float(val)) for step, stream, val in (line.split() for line in f) if stream == "val"]
    print(f"{name:>16}: final val {curve[-1][1]:.4f}  [{shlex.join(map(str, flags))}]", flush=True)
    return curve, [float(ms) / 1000 for ms in re.findall(r"\| dt ([0-9.]+)ms", out)][2:]


def bench_recipe(args):
    """recipes: tokens to reach the gpt2 recipe's final val loss, and time per token (train_gpt2.py runs)"""
    runs = {name: BENCH_RECIPES[name] for name in args.recipes.split(",") if name}
    runs.update((name, shlex.split(flags)) for name, _, flags in (v.partition("=") for v in args.variant or []))
    if "gpt2" not in runs:
        raise UsageError("--recipes must include gpt2: its final val loss is the target")
    tokens = args.batch_size * args.seq_len * args.accum
    data = args.data or os.path.join(HERE, "input.txt")
    common = ["--data", data, "--model", args.model, "--batch_size", args.batch_size, "--seq_len", args.seq_len,
              "--total_batch_size", tokens, "--dtype", args.dtype, "--device", pick_device(args.device),
              "--max_steps", args.recipe_steps] + RECIPE_COMMON
    log_root = args.log_root or tempfile.mkdtemp(prefix="bench_recipe_")
    print(f"bench recipe: --model {args.model}, {args.recipe_steps} steps of {tokens} tokens of {data}, "
          f"{args.repeats} interleaved run(s) per recipe; logs in {log_root}/<recipe>/log.txt")

    # each round trains every recipe again (same seed, same curve): more steps to time, and load hits all alike
    results = interleaved({n: partial(recipe_run, common, n, f, log_root) for n, f in runs.items()}, args.repeats)
    curves = {name: rs[0][0] for name, rs in results.items()}
    print("\nval loss\n" + f"{'step':>6} {'tokens':>9} " + " ".join(f"{n:>16}" for n in runs))
    for s in sorted({s for c in curves.values() for s, _ in c}):
        row = [dict(curves[n]).get(s) for n in runs]
        print(f"{s:>6} {s * tokens:>9} " + " ".join(f"{v:>16.4f}" if v is not None else f"{'':>16}" for v in row))
    target = curves["gpt2"][-1][1]
    print(f"\ntarget: the gpt2 recipe's final val loss {target:.4f} after {args.recipe_steps * tokens} tokens")
    times = {name: [t for _, ts in rs for t in ts] for name, rs in results.items()}
    dt = {name: median(t) for name, t in times.items()}
    for name in runs:
        s = steps_to_reach(curves[name], target)
        reach = f"{100 * s / args.recipe_steps:.0f}%" if s is not None else "not reached"
        print(f"{name:>16}: tokens to reach the gpt2 recipe's final val loss: {reach} | "
              f"{1e6 * dt[name] / tokens:.1f} us/token, {dt[name] / dt['gpt2']:.3f}x gpt2's "
              f"(median of {len(times[name])} steps)")


# -----------------------------------------------------------------------------
# Command line

MODES = dict(train=bench_train, memory=bench_memory, sample=bench_sample, data=bench_data, recipe=bench_recipe)


def with_defaults(args):
    """args with each mode's defaults filled in; UsageError for flags of another mode."""
    on_gpu = pick_device(args.device).startswith("cuda")
    # sampling compares the algorithm, not the model; recipes are short CPU runs
    args.model = args.model or ("d4" if args.mode in ("sample", "recipe") else "gpt2")
    with common.model_errors_as_usage_errors():  # an unknown --model fails here, before any work
        config = model_config(args.model, args.vocab_size)
    if args.mode == "recipe":  # a short CPU run of a small model
        B, T = 16, 128
    elif args.mode == "data":  # gpt2's micro-batch in train_gpt2.py
        B, T = 64, 1024
    elif args.procs > 1:  # the state bytes per rank are exact at any shape: a small one is enough
        B, T = 2, 128
    else:  # sample: 4 sequences, as train_gpt2.py --sample (--num_samples 4) and its in-training samples do
        B, T = (16 if on_gpu and args.mode != "sample" else 4), (1024 if on_gpu else 256)
    args.batch_size, args.seq_len = args.batch_size or B, args.seq_len or T
    args.compile = int(args.mode == "train") if args.compile is None else args.compile
    args.steps = args.steps or (2 if args.mode == "memory" else 5)
    args.repeats = args.repeats or {"memory": 2, "data": 5, "recipe": 1}.get(args.mode, 3)
    if args.mode in ("train", "memory"):
        checks.check_seq_len(args.seq_len, config.block_size)
    for wrong, message in [
        (args.batch_size == "auto" and args.mode != "train", "--batch_size auto is for --mode train"),
        (args.compare != "none" and args.mode != "train", "--compare is for --mode train"),
        (args.compare == "hf" and not find_spec("transformers"), "--compare hf needs transformers: pip install "
         "transformers"),
        ((args.procs > 1 or args.fsdp) and args.mode != "memory", "--procs and --fsdp are for --mode memory"),
        (args.fsdp and args.procs == 1, "--fsdp shards over processes: add --procs N (N >= 2)"),
        (not set(filter(None, args.recipes.split(","))) <= set(BENCH_RECIPES), f"--recipes {args.recipes}: use names "
         f"from {', '.join(BENCH_RECIPES)}, comma-separated (--variant NAME=FLAGS adds others)"),
        (args.mode == "sample" and 8 + args.max_new_tokens > config.block_size, f"--max_new_tokens "
         f"{args.max_new_tokens} plus the 8-token prompt is longer than block_size {config.block_size}"),
    ]:
        if wrong:
            raise UsageError(message)
    return args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmarks for train_gpt2.py (examples: docs/performance.md).")
    modes = "; ".join(f"{name}: {' '.join(fn.__doc__.split())}" for name, fn in MODES.items())
    p.add_argument("--mode", default="train", choices=list(MODES), help=f"what to measure (default: train). {modes}")
    p.add_argument("--_worker_out", dest="worker_out", help=argparse.SUPPRESS)  # a process of fresh_processes
    g = p.add_argument_group("model and shape")
    g.add_argument("--model", help="gpt2, gpt2-medium, ..., or dN (default: gpt2; d4 for sample, recipe)")
    g.add_argument("--vocab_size", type=int, default=50304, help="ours (default: 50304); Hugging Face's is 50257")
    g.add_argument("--batch_size", type=batch_size_arg, help="micro-batch B per rank, or sequences sampled at once "
                   "(default: 4, 16 on a GPU but for sample; --procs 2; data 64; recipe 16); 'auto': as train_gpt2.py")
    g.add_argument("--seq_len", type=positive_int, help="T (default: 256, GPU 1024; --procs, recipe 128; data 1024)")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu, the default), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="autocast dtype, as in train_gpt2.py (default: auto)")
    g.add_argument("--compile", type=int, choices=[0, 1], help="torch.compile (default: 1 for train, else 0)")
    g.add_argument("--loss_chunk_size", type=positive_int, help="ours: positions per chunk (default: the device's)")
    g = p.add_argument_group("timing")
    g.add_argument("--compare", default="none", choices=["none", "hf", "ladder"], help="train: hf: also transformers' "
                   "GPT2LMHeadModel; ladder: from fp32 to our defaults one change at a time (default: none); "
                   "--compile 0 leaves out the compiled variants")
    g.add_argument("--warmup", type=positive_int, default=1, help="train: untimed steps per variant (default: 1)")
    g.add_argument("--steps", type=positive_int, help="train, memory: timed steps per variant (default: 5, memory 2)")
    g.add_argument("--repeats", type=positive_int, help="interleaved rounds (default: memory 2, sample 3, data 5, "
                   "recipe 1)")
    g.add_argument("--max_new_tokens", type=positive_int, default=256, help="sample: tokens a sequence (default: 256)")
    g = p.add_argument_group("memory per rank (--mode memory)")
    g.add_argument("--procs", type=positive_int, default=1, help="N > 1: memory per rank of DDP under torchrun with "
                   "N processes (default: 1: full logits vs chunked loss)")
    g.add_argument("--fsdp", action="store_true", help="with --procs: FSDP (train_gpt2.py --fsdp) beside DDP")
    g = p.add_argument_group("data (--mode data)")
    g.add_argument("--batches", type=positive_int, default=100, help="batches per timing (default: 100)")
    g.add_argument("--gap_ms", type=float, default=20, help="sleep between batches: the micro-step (default: 20)")
    g.add_argument("--shards", type=positive_int, default=4, help="shards of random tokens (default: 4)")
    g.add_argument("--shard_tokens", type=positive_int, default=10**8, help="tokens a shard (default: 100M, fineweb's)")
    g.add_argument("--data_dir", help="where the shards are written (default: a temporary directory)")
    g = p.add_argument_group("recipes (--mode recipe)")
    g.add_argument("--data", help="train_gpt2.py --data: a .txt or a shard directory (default: the repo's input.txt)")
    g.add_argument("--recipes", default=",".join(BENCH_RECIPES), help="comma-separated (default: all: %(default)s)")
    g.add_argument("--variant", action="append", help='"NAME=train_gpt2.py flags": one more run (repeatable)')
    g.add_argument("--recipe_steps", type=positive_int, default=40, help="optimizer steps per run (default: 40)")
    g.add_argument("--accum", type=positive_int, default=2, help="micro-batches per step (default: 2)")
    g.add_argument("--log_root", help="a log dir per recipe, for play.ipynb (default: a temporary dir)")
    return with_defaults(p.parse_args(argv))


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.worker_out:
            return memory_worker(args.worker_out)
        if not pick_device(args.device).startswith("cuda"):
            warn_if_busy()
        MODES[args.mode](args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
