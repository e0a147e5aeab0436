"""
Benchmarks for train_gpt2.py: training speed (tokens/s, MFU) against Hugging Face transformers in one process,
peak memory of the chunked loss, sampling with the KV cache, batched HellaSwag, the data loaders.

Every comparison runs its variants interleaved (A, B, A, B, ...) in one run and reports medians, so that load from
other programs hits all of them alike.

    python bench.py --model gpt2 --batch_size 4 --seq_len 256 --compare hf    # ours vs GPT2LMHeadModel, CPU
    python bench.py --model gpt2 --batch_size 16 --seq_len 1024              # one GPU: tokens/s and MFU
    python bench.py --mode memory --model gpt2 --batch_size 8 --seq_len 1024  # full logits vs chunked loss
    python bench.py --mode sample                                             # KV cache vs a forward per token
    python bench.py --mode hellaswag                                          # batched vs one example at a time
    python bench.py --mode data                                               # DataLoaderLite batches/s
    python bench.py --mode allocator                                          # tune_cpu_allocator() on vs off
    python bench.py --mode fineweb                                            # fineweb.py tokens/s, 1 vs 2 processes
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from train_gpt2 import (
    GPT,
    GPT2_VOCAB,
    DataLoaderLite,
    GPTConfig,
    UsageError,
    autocast_context,
    batch_size_arg,
    cuda_fits,
    find_batch_size,
    flops_per_token,
    gpu_peak_flops,
    model_config,
    pick_device,
    pick_dtype,
    positive_int,
    tune_cpu_allocator,
)

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

# -----------------------------------------------------------------------------
# Measuring


def now(device_type):
    """A timestamp after the GPU has finished its queued work (CUDA kernels run asynchronously)."""
    if device_type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_rss_bytes():
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def cpu_seconds():
    """(user, system) CPU seconds of this process: system time is the kernel's, e.g. page faults."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def cpu_matmul_peak(dtype, n=2048, reps=3):
    """FLOP/s of the best of `reps` (n, n) @ (n, n) matmuls: the rate the CPU's matmul library reaches here."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _cpu_jiffies():
    """(busy, total) CPU time of the whole machine from /proc/stat, in clock ticks; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)  # idle and iowait are not busy


def _own_cpu_seconds():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class OtherLoad:
    """The share of the machine's CPU time that other programs used between start() and share(): the load average
    cannot tell, as it counts this benchmark's own threads. Other programs slow CPU timings far more than their
    share: OpenMP threads wait for each other at every parallel region, and one thread that is not scheduled
    stalls them all (here at load 6 on 2 cores, a small model's steps ran 25x slower)."""

    def start(self):
        self.jiffies, self.own = _cpu_jiffies(), _own_cpu_seconds()
        return self

    def share(self):
        now_jiffies = _cpu_jiffies()
        if self.jiffies is None or now_jiffies is None or now_jiffies[1] == self.jiffies[1]:
            return None
        busy, total = (b - a for a, b in zip(self.jiffies, now_jiffies))
        hz = os.sysconf("SC_CLK_TCK")
        others = busy / hz - (_own_cpu_seconds() - self.own)
        return min(1.0, max(0.0, others / (total / hz)))


def other_load(args):
    """'; other programs used X% of the CPU' since main() started, for a result line; '' where unknown."""
    share = args.other_load.share() if getattr(args, "other_load", None) else None
    return "" if share is None else f"; other programs used {100 * share:.0f}% of the machine's CPU time meanwhile"


def warn_if_busy():
    """One second of /proc/stat before starting: a busy machine gives slow and noisy CPU timings."""
    probe = OtherLoad().start()
    time.sleep(1.0)
    share = probe.share()
    if share is not None and share > 0.25:
        print(f"warning: other programs used {100 * share:.0f}% of the CPU in the last second: timings will be slower "
              f"and noisier than on an idle machine (ratios of interleaved variants hold up better than absolute numbers)")


def device_description(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def dtype_name(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def gib(n):
    return f"{n / 2**30:.2f} GiB"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# -----------------------------------------------------------------------------
# Training step variants: ours and Hugging Face's GPT2LMHeadModel


def adamw(model, fused):
    """AdamW with GPT-2's decay groups; fused=False is torch's default implementation (a for-loop on CPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True if fused else None)


class Variant:
    """One way of running a training step: a model, its optimizer, the autocast dtype, and how it gets a loss."""

    def __init__(self, name, impl, dtype, compile, fused, chunked=True, chunk_size=None, tf32=True):
        self.name, self.impl, self.dtype, self.tf32 = name, impl, dtype, tf32
        self.compile, self.fused, self.chunked, self.chunk_size = compile, fused, chunked, chunk_size
        self.times, self.losses, self.sys_frac, self.peak_mem = [], [], [], 0
        self.first_step_s = None

    def build(self, config, device):
        torch.manual_seed(1337)
        if self.impl == "ours":
            self.model = GPT(config).to(device)
            self.flops_config = config
        else:
            from transformers import GPT2Config, GPT2LMHeadModel

            hf_config = GPT2Config(
                vocab_size=GPT2_VOCAB, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
                n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            )
            self.model = GPT2LMHeadModel(hf_config).to(device)  # attention: the default implementation (sdpa)
            self.model.loss_type = "ForCausalLM"  # its default; saying so silences a warning
            self.flops_config = GPTConfig(block_size=config.block_size, vocab_size=GPT2_VOCAB, n_layer=config.n_layer,
                                          n_head=config.n_head, n_embd=config.n_embd)
        self.model.train()
        self.optimizer = adamw(self.model, self.fused)
        self.forward = torch.compile(self.model) if self.compile else self.model

    def loss(self, x, y):
        if self.impl == "ours":
            kw = {"loss_chunk_size": self.chunk_size} if self.chunk_size else {}  # else the model's default
            return self.forward(x, y, return_logits=not self.chunked, **kw)[1]
        # Hugging Face shifts the labels itself: labels are the inputs
        return self.forward(input_ids=x, labels=x, use_cache=False).loss

    def step(self, x, y, device_type):
        """One training step as train() runs it; returns the seconds of (forward, backward, clip + optimizer)."""
        if device_type == "cuda":  # TF32 tensor cores for float32 matmuls: train() turns them on, torch's default is off
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        u0, s0 = cpu_seconds()
        t0 = now(device_type)
        with autocast_context(device_type, self.dtype):
            loss = self.loss(x, y)
        t1 = now(device_type)
        loss.backward()
        t2 = now(device_type)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = now(device_type)
        u1, s1 = cpu_seconds()
        self.last_loss = loss.item()
        self.last_sys_frac = (s1 - s0) / max(1e-9, (u1 - u0) + (s1 - s0))
        return t1 - t0, t2 - t1, t3 - t2


def train_variants(args, dtype):
    compiled = bool(args.compile)
    chunk = f" (loss_chunk_size {args.loss_chunk_size})" if args.loss_chunk_size else ""
    ours = Variant(
        f"ours: {dtype_name(dtype)}{', compile' if compiled else ''}, fused AdamW, chunked loss{chunk}",
        "ours", dtype, compiled, fused=True, chunked=True, chunk_size=args.loss_chunk_size,
    )
    if args.compare == "none":
        return [ours]
    if args.compare == "hf":
        variants = [
            ours,
            Variant("hf GPT2LMHeadModel: fp32, default AdamW", "hf", torch.float32, False, fused=False, tf32=False),
            Variant(f"hf GPT2LMHeadModel: {dtype_name(dtype)}, fused AdamW, no compile (transformers' default)",
                    "hf", dtype, False, fused=True),
        ]
        if compiled:
            variants.append(Variant(f"hf GPT2LMHeadModel: {dtype_name(dtype)}, compile, fused AdamW (all our settings)",
                                    "hf", dtype, True, fused=True))
        return variants
    # ladder: the recipe one change at a time, from plain fp32 to our defaults
    return [
        Variant("ours: fp32, default AdamW, full logits", "ours", torch.float32, False, fused=False, chunked=False, tf32=False),
        Variant("ours: fp32, fused AdamW, full logits", "ours", torch.float32, False, fused=True, chunked=False),
        Variant("ours: fp32, fused AdamW, chunked loss", "ours", torch.float32, False, fused=True, chunked=True),
        Variant(f"ours: {dtype_name(dtype)}, fused AdamW, chunked loss", "ours", dtype, False, fused=True, chunked=True),
        Variant(f"ours: {dtype_name(dtype)}, compile, fused AdamW, chunked loss", "ours", dtype, True, fused=True, chunked=True),
    ]


def peak_flops_for(variant, device_type, device, cpu_peaks):
    """(peak FLOP/s, what it is) for MFU: the datasheet bf16 peak on a GPU, the measured matmul peak on CPU."""
    if device_type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device)), "datasheet bf16 peak"
    peak = median(cpu_peaks[variant.dtype])
    return peak, f"measured {dtype_name(variant.dtype)} matmul peak"


def bench_train(args):
    device = pick_device(args.device)
    device_type = device.split(":")[0]
    dtype = pick_dtype(args.dtype, device_type)
    if args.tune_allocator and device_type == "cpu":
        tune_cpu_allocator()  # as train() does; process-wide, so the Hugging Face variants get it too
    t_start = time.time()
    config = model_config(args.model, args.vocab_size)
    B, T = args.batch_size, args.seq_len
    if T > config.block_size:
        raise UsageError(f"--seq_len {T} is longer than the model's block_size {config.block_size}")
    if B == "auto":
        if device_type != "cuda":
            raise UsageError("--batch_size auto needs a CUDA GPU (it searches for the largest micro-batch that fits in GPU memory)")
        probe = GPT(config).to(device)
        B = find_batch_size(lambda b: cuda_fits(probe, b, T, device, device_type, dtype), 512)
        del probe
        torch.cuda.empty_cache()
        print(f"--batch_size auto: micro-batch {B}")
    variants = train_variants(args, dtype)
    print(f"bench train: --model {args.model} ({GPT(config).num_params() / 1e6:.2f}M parameters), B={B}, T={T} "
          f"({B * T} tokens/step), device {device} ({device_description(device)}), torch {torch.__version__}, "
          f"tune_cpu_allocator {'on' if args.tune_allocator and device_type == 'cpu' else 'off'}")
    if args.compare == "hf":
        try:
            import transformers
        except ImportError:
            raise UsageError("--compare hf needs transformers: pip install transformers") from None

        print(f"transformers {transformers.__version__}; GPT2LMHeadModel with its default attention (sdpa), dropout 0, "
              f"vocab {GPT2_VOCAB}, labels = inputs (it shifts them itself), use_cache=False")
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, GPT2_VOCAB, (B, T + 1), generator=g)
    x, y = data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)

    for v in variants:  # build and warm up (the first step compiles)
        v.build(config, device)
        for i in range(args.warmup):
            t0 = time.time()
            v.step(x, y, device_type)
            if i == 0:
                v.first_step_s = time.time() - t0
        print(f"  built and warmed up {v.name}: first step {v.first_step_s:.1f}s", flush=True)

    dtypes = sorted({v.dtype for v in variants}, key=str)
    cpu_peaks = {d: [] for d in dtypes}
    for r in range(args.steps):  # interleaved: A, B, C, A, B, C, ...
        for v in variants:
            if device_type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            v.times.append(v.step(x, y, device_type))
            v.losses.append(v.last_loss)
            v.sys_frac.append(v.last_sys_frac)
            if device_type == "cuda":
                v.peak_mem = max(v.peak_mem, torch.cuda.max_memory_allocated(device))
        if device_type == "cpu":
            for d in dtypes:  # the peak is measured under the same load as the steps
                cpu_peaks[d].append(cpu_matmul_peak(d))
        print(f"  round {r + 1}/{args.steps}: " + ", ".join(f"{sum(v.times[-1]) * 1000:.0f}ms" for v in variants), flush=True)

    if device_type == "cpu":
        print("CPU matmul peak (2048^3, best of 3 per round, median): "
              + ", ".join(f"{dtype_name(d)} {median(p) / 1e9:.0f} GFLOP/s" for d, p in cpu_peaks.items()))
    for v in variants:
        fwd, bwd, opt = (median([t[i] for t in v.times]) for i in range(3))
        step_s = median([sum(t) for t in v.times])
        tok_s = B * T / step_s
        flops = flops_per_token(v.flops_config, T) * B * T
        peak, peak_what = peak_flops_for(v, device_type, device, cpu_peaks)
        if peak:
            # forward+backward alone is what a step costs per micro-batch under gradient accumulation
            mfu = (f"MFU {100 * flops / step_s / peak:.1f}% (forward+backward alone {100 * flops / (fwd + bwd) / peak:.1f}%) "
                   f"of {peak_what} ({peak / 1e12:.3g} TFLOP/s)")
        else:
            mfu = "MFU n/a (GPU not in train_gpt2.GPU_PEAK_FLOPS)"
        mem = f" | peak mem {gib(v.peak_mem)}" if device_type == "cuda" else ""
        sys_note = f" | kernel {100 * median(v.sys_frac):.0f}% of CPU time" if device_type == "cpu" else ""
        print(f"{v.name}\n    {tok_s:9.1f} tok/s | {step_s * 1000:.1f} ms/step (forward {fwd * 1000:.1f}, backward {bwd * 1000:.1f}, "
              f"clip+optimizer {opt * 1000:.1f}) | {flops / step_s / 1e9:.1f} GFLOP/s | {mfu}{mem}{sys_note} | loss {v.losses[-1]:.4f}")
    if device_type == "cpu":
        print(f"peak RSS of this process (all variants together): {gib(peak_rss_bytes())}")
    print(f"{args.steps} timed steps per variant after {args.warmup} warm-up; total time {time.time() - t_start:.1f}s{other_load(args)}")

    def speedup(fast, slow):  # the median of each round's ratio: a slow spell hits both sides of a round alike
        return median([sum(b) / sum(a) for a, b in zip(fast.times, slow.times)])

    if args.result_json:  # for --mode allocator, which runs this in child processes
        print("RESULT " + json.dumps({"tok_s": B * T / median([sum(t) for t in variants[0].times]), "sys_frac": median(variants[0].sys_frac)}))
    if args.compare == "hf":
        ours, hf = variants[0], variants[1:]
        print(f"ratio vs hf {dtype_name(dtype)} + fused AdamW without torch.compile: {speedup(ours, hf[1]):.2f}")
        print(f"ratio vs hf fp32: {speedup(ours, hf[0]):.2f}  vs hf same settings: {speedup(ours, hf[-1]):.2f}")
    elif args.compare == "ladder":
        print("speed-up over the first: " + ", ".join(f"{speedup(v, variants[0]):.2f}x" for v in variants))


# -----------------------------------------------------------------------------
# Peak memory: full logits vs chunked loss, each in a fresh process


def memory_child(args):
    """One process, one variant: its peak memory and losses as a JSON line."""
    device = pick_device(args.device)
    device_type = device.split(":")[0]
    dtype = pick_dtype(args.dtype, device_type)
    if args.tune_allocator and device_type == "cpu":
        tune_cpu_allocator()
    torch.manual_seed(1337)
    config = model_config(args.model, args.vocab_size)
    model = GPT(config).to(device).train()
    optimizer = model.configure_optimizers(0.1, 6e-4, device_type)
    forward = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, GPT2_VOCAB, (args.batch_size, args.seq_len + 1), generator=g)
    x, y = data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)
    full = args._memory_child == "full"
    base = torch.cuda.memory_allocated(device) if device_type == "cuda" else peak_rss_bytes()
    losses, times = [], []
    # two steps: from the second on the AdamW state exists, as in a real run
    for _ in range(args.steps):
        t0 = now(device_type)
        with autocast_context(device_type, dtype):
            kw = {"loss_chunk_size": args.loss_chunk_size} if args.loss_chunk_size else {}
            _, loss = forward(x, y, return_logits=full, **kw)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(now(device_type) - t0)
    peak = torch.cuda.max_memory_allocated(device) if device_type == "cuda" else peak_rss_bytes()
    print("MEMORY " + json.dumps({"peak": peak, "before_steps": base, "losses": losses, "times": times,
                                  "dtype": dtype_name(dtype)}))


def run_child(args, extra):
    """Run bench.py again in a fresh process with the same model flags; returns its stdout."""
    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--batch_size", str(args.batch_size),
           "--seq_len", str(args.seq_len), "--dtype", args.dtype, "--device", args.device,
           "--vocab_size", str(args.vocab_size), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise UsageError(f"child run failed ({' '.join(cmd[1:])}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def bench_memory(args):
    t_start = time.time()
    device_type = pick_device(args.device).split(":")[0]
    what = "max_memory_allocated" if device_type == "cuda" else "peak RSS"
    print(f"bench memory: --model {args.model}, B={args.batch_size}, T={args.seq_len}, {args.steps} training steps in a "
          f"fresh process per variant, {args.repeats} interleaved rounds, compile {bool(args.compile)}, tune_cpu_allocator "
          f"{'on' if args.tune_allocator and device_type == 'cpu' else 'off'}")
    chunked_name = f"chunked loss (loss_chunk_size={args.loss_chunk_size})" if args.loss_chunk_size else "chunked loss (return_logits=False)"
    names = {"full": "full logits (model(x, y, return_logits=True))", "chunked": chunked_name}
    extra = ["--loss_chunk_size", str(args.loss_chunk_size)] if args.loss_chunk_size else []
    results = {"full": [], "chunked": []}
    for _ in range(args.repeats):  # peak RSS varies from run to run with how the heap fragments: take medians
        for variant in results:
            out = run_child(args, ["--_memory_child", variant, "--steps", str(args.steps), "--compile", str(args.compile),
                                   "--tune_allocator", str(args.tune_allocator), *extra])
            results[variant].append(r := json.loads(out.split("MEMORY ", 1)[1]))
            print(f"{names[variant]:48s} {r['dtype']}: {what} {gib(r['peak'])} (before the steps {gib(r['before_steps'])}), "
                  f"losses {', '.join(f'{l:.6f}' for l in r['losses'])}, step times {', '.join(f'{t:.1f}s' for t in r['times'])}", flush=True)
    peak = {k: median([r["peak"] for r in rs]) for k, rs in results.items()}
    own = {k: median([r["peak"] - r["before_steps"] for r in rs]) for k, rs in results.items()}
    diff = max(abs(a - b) for f, c in zip(results["full"], results["chunked"]) for a, b in zip(f["losses"], c["losses"]))
    print(f"median {what}: full logits {gib(peak['full'])}, chunked loss {gib(peak['chunked'])}")
    print(f"peak memory with the chunked loss: {100 * (peak['chunked'] / peak['full'] - 1):+.1f}% "
          f"(the steps' own memory above the model: {100 * (own['chunked'] / max(1, own['full']) - 1):+.1f}%); "
          f"largest loss difference {diff:.2e}; total time {time.time() - t_start:.1f}s")


# -----------------------------------------------------------------------------
# Allocator: tune_cpu_allocator() on vs off; it is process-wide, so each run is a fresh process


def bench_allocator(args):
    t_start = time.time()
    print(f"bench allocator: --model {args.model}, B={args.batch_size}, T={args.seq_len}, compile {bool(args.compile)}, "
          f"{args.repeats} rounds of one fresh process per setting, each {args.warmup} warm-up + {args.steps} timed steps")
    runs = {0: [], 1: []}
    for r in range(args.repeats):
        for tune in (0, 1):  # interleaved
            out = run_child(args, ["--mode", "train", "--compare", "none", "--compile", str(args.compile),
                                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                                   "--tune_allocator", str(tune), "--result_json"])
            runs[tune].append(json.loads(out.split("RESULT ", 1)[1]))
            print(f"  round {r + 1} tune_cpu_allocator {'on ' if tune else 'off'}: {runs[tune][-1]['tok_s']:.1f} tok/s, "
                  f"kernel {100 * runs[tune][-1]['sys_frac']:.0f}% of CPU time", flush=True)
    tok = {k: median([r["tok_s"] for r in v]) for k, v in runs.items()}
    sys_frac = {k: median([r["sys_frac"] for r in v]) for k, v in runs.items()}
    for k, label in ((0, "glibc malloc defaults"), (1, "tune_cpu_allocator()")):
        print(f"{label:22s} {tok[k]:9.1f} tok/s | kernel {100 * sys_frac[k]:.0f}% of CPU time")
    print(f"tune_cpu_allocator speed-up: {tok[1] / tok[0]:.2f}x; total time {time.time() - t_start:.1f}s")


# -----------------------------------------------------------------------------
# Sampling: KV cache vs a full forward per new token


@torch.no_grad()
def generate_without_cache(model, idx, max_new_tokens):
    """Greedy decoding the way it is done without a cache: the whole sequence through the model per token."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat([idx, logits[:, -1, :GPT2_VOCAB].argmax(-1, keepdim=True)], dim=1)
    return idx


def random_eval_model(args):
    """(device, device_type, autocast dtype, a randomly initialized --model in eval mode) for the inference benchmarks."""
    device = pick_device(args.device)
    device_type = device.split(":")[0]
    dtype = pick_dtype(args.dtype, device_type)
    if device_type == "cpu" and args.tune_allocator:
        tune_cpu_allocator()
    torch.manual_seed(1337)
    model = GPT(model_config(args.model, args.vocab_size)).to(device).eval()
    return device, device_type, dtype, model


def bench_sample(args):
    device, device_type, dtype, model = random_eval_model(args)
    B, n = args.batch_size, args.max_new_tokens
    prompt = torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11]] * B, device=device)  # "Hello, I'm a language model,"
    if prompt.size(1) + n > model.config.block_size:
        raise UsageError(f"--max_new_tokens {n} plus the 8-token prompt is longer than block_size {model.config.block_size}")
    print(f"bench sample: --model {args.model} ({model.num_params() / 1e6:.2f}M parameters), {B} sequence(s) x {n} new tokens "
          f"after an 8-token prompt, greedy, {dtype_name(dtype)}, device {device} ({device_description(device)}), "
          f"{args.repeats} interleaved repeats")
    variants = {
        "with KV cache (model.generate)": lambda: model.generate(prompt, n, top_k=1),
        "without cache (a full forward per token)": lambda: generate_without_cache(model, prompt, n),
    }
    outs, times = {}, {k: [] for k in variants}
    for name, fn in variants.items():  # warm-up, and check both decode the same tokens
        with autocast_context(device_type, dtype):
            outs[name] = fn()
    same = torch.equal(*outs.values())
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = now(device_type)
            with autocast_context(device_type, dtype):
                fn()
            times[name].append(now(device_type) - t0)
    med = {k: median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"{name:42s} {B * n / t:9.1f} tok/s | {t:.3f}s (all: {', '.join(f'{x:.2f}' for x in times[name])})")
    cached, uncached = med.values()
    print(f"identical tokens: {same}")
    print(f"sampling speed-up with the KV cache: {uncached / cached:.2f}x")


# -----------------------------------------------------------------------------
# HellaSwag: batched vs one example at a time


def bench_hellaswag(args):
    import hellaswag

    device, device_type, dtype, model = random_eval_model(args)
    try:
        examples = hellaswag.load_examples(data=args.data, limit=args.limit)
    except (OSError, ValueError) as e:
        raise UsageError(f"HellaSwag data: {e}") from None
    autocast = None if dtype == torch.float32 else dtype
    bs = args.hellaswag_batch_size
    variants = {
        "one at a time": dict(batch_size=1, fixed_shapes=False),
        f"batched ({bs} examples = {4 * bs} rows per forward)": dict(batch_size=bs, fixed_shapes=False),
        "batched, fixed shapes (as when compiled)": dict(batch_size=bs, fixed_shapes=True),
    }
    print(f"bench hellaswag: --model {args.model} ({model.num_params() / 1e6:.2f}M parameters, random weights), "
          f"{len(examples)} examples, {dtype_name(dtype)}, device {device} ({device_description(device)}), "
          f"{args.repeats} interleaved repeats")
    preds = {}
    for name, kw in variants.items():  # warm-up; also checks that every variant predicts the same
        preds[name] = hellaswag.predict(model, device, examples, autocast_dtype=autocast, **kw)[:2]
    first = next(iter(preds.values()))
    same = all(torch.equal(p[0], first[0]) and torch.equal(p[1], first[1]) for p in preds.values())
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, kw in variants.items():
            t0 = now(device_type)
            hellaswag.predict(model, device, examples, autocast_dtype=autocast, **kw)
            times[name].append(now(device_type) - t0)
    base = median(times["one at a time"])
    for name, ts in times.items():
        t = median(ts)
        print(f"{name:48s} {len(examples) / t:8.1f} examples/s | {t:.3f}s | {base / t:.2f}x")
    print(f"identical predictions: {same}")
    batched = median(times[list(variants)[1]])
    print(f"batched HellaSwag speed-up: {base / batched:.2f}x")


# -----------------------------------------------------------------------------
# Data loading: DataLoaderLite batches/s


def time_loader(loader, n):
    loader.next_batch()
    t0 = time.perf_counter()
    for _ in range(n):
        loader.next_batch()
    return (time.perf_counter() - t0) / n


def bench_data(args):
    from train_gpt2 import ensure_text_data

    B, T = args.batch_size, args.seq_len
    config = model_config(args.model, args.vocab_size)
    text = args.data or "input.txt"
    if not text.endswith(".txt"):
        raise UsageError(f"--mode data: --data must be a .txt file (got {text}); the .npy shards are made in a temp dir")
    ensure_text_data(text)
    print(f"bench data: DataLoaderLite B={B}, T={T}, {args.repeats} interleaved repeats of {args.batches} batches")
    t0 = time.perf_counter()
    txt_loader = DataLoaderLite(B, T, split="train", data_root=text)
    tokenize_s = time.perf_counter() - t0
    n_tokens = sum(len(s) for s in txt_loader.shards)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        shard_tokens = max(2**22, 4 * (B * T + 1))
        for i in range(3):  # shards named as fineweb.py names them, one val and two train
            split = "val" if i == 0 else "train"
            np.save(os.path.join(tmp, f"edufineweb_{split}_{i:06d}.npy"), rng.integers(0, GPT2_VOCAB, shard_tokens, dtype=np.uint16))
        npy_loader = DataLoaderLite(B, T, split="train", data_root=tmp)
        times = {"text": [], "npy": []}
        for _ in range(args.repeats):
            times["text"].append(time_loader(txt_loader, args.batches))
            times["npy"].append(time_loader(npy_loader, args.batches))
    # the fastest a training step of this shape can be: its FLOPs at the measured matmul peak
    dtype = pick_dtype(args.dtype, "cpu")
    step_floor = flops_per_token(config, T) * B * T / cpu_matmul_peak(dtype)
    print(f"{text}: {n_tokens:,} train tokens, tokenized in {tokenize_s:.2f}s when the loader is made")
    for name, label in (("text", f"{os.path.basename(text)} (tokens in memory)"), ("npy", "3 .npy shards (memory-mapped)")):
        t = median(times[name])
        print(f"{label:34s} {1 / t:10.0f} batches/s | {t * 1e6:8.1f} us/batch | {B * T / t / 1e6:8.1f}M tokens/s | "
              f"{100 * t / step_floor:.2g}% of a --model {args.model} step")
    print(f"(a --model {args.model} training step at B={B}, T={T} takes at least {step_floor * 1000:.0f} ms on this CPU: "
          f"its FLOPs at the measured {dtype_name(dtype)} matmul peak)")


# -----------------------------------------------------------------------------
# fineweb.py: tokens/s with 1 and 2 (or more) processes, and peak memory (written with the fineweb.py work)

# runs one fineweb.main() in a fresh interpreter and reports its peak memory: ru_maxrss of the main process and of
# the largest worker (both count the pages of the memory-mapped Arrow cache they touched), and, sampled from /proc
# every 50 ms on Linux, the peak of the whole process tree's anonymous memory (heap, buffers: what cannot be paged
# back to the file)
_FINEWEB_CHILD = """
import json, os, resource, sys, threading, time
import fineweb

def tree_anon_kib():
    pids, total = [os.getpid()], 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))
        except (OSError, StopIteration):
            pass
    return total

peak, done = [0], threading.Event()
def sample():
    while not done.wait(0.05):
        peak[0] = max(peak[0], tree_anon_kib())
if os.path.exists("/proc/self/task"):
    threading.Thread(target=sample, daemon=True).start()
t = time.time()
stats = fineweb.main(sys.argv[1:])
stats["wall_s"] = time.time() - t
done.set()
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
stats.update(main_rss=me.ru_maxrss * scale, worker_rss=kids.ru_maxrss * scale, tree_anon=peak[0] * 1024,
             cpu_s=me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime)
print("BENCH " + json.dumps(stats))
"""


def bench_fineweb(args):
    sample = args.data or os.path.join(SHARED, "fineweb_sample", "fineweb_sample_300.jsonl")
    if not os.path.isfile(sample):
        raise UsageError(f"--mode fineweb: {sample} does not exist; pass --data with a FineWeb-style .jsonl (one {{\"text\": ...}} per line)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    if "TIKTOKEN_CACHE_DIR" not in env and os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
        env["TIKTOKEN_CACHE_DIR"] = os.path.join(SHARED, "tiktoken_cache")
    os.environ.update({k: env[k] for k in ("TIKTOKEN_CACHE_DIR",) if k in env})
    import fineweb

    with open(sample) as f:
        lines = f.read().splitlines(keepends=True)
    texts = [json.loads(line)["text"] for line in lines]
    # calibrate: how many copies of the sample make a one-process run last about --seconds
    fineweb.init_worker()
    fineweb.tokenize_batch(texts[:10])
    t = time.time()
    sample_tokens = sum(len(fineweb.tokenize_batch(texts[i:i + 64])[0]) for i in range(0, len(texts), 64))
    rate = sample_tokens / (time.time() - t) / 1.2  # the whole pipeline is a bit slower than tokenizing alone
    copies = max(1, math.ceil(args.seconds * rate / sample_tokens))
    print(f"bench fineweb: {len(texts)} docs, {sample_tokens:,} tokens; ~{rate / 1e6:.2f}M tokens/s on one core here, "
          f"so {copies} copies ({copies * sample_tokens / 1e6:.1f}M tokens) per run")

    try:
        procs = [int(p) for p in args.procs.split(",")]
    except ValueError:
        raise UsageError(f"--procs {args.procs!r}: expected whole numbers separated by commas, e.g. 1,2") from None
    results = {p: [] for p in procs}
    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "corpus.jsonl")
        with open(corpus, "w") as f:
            for _ in range(copies):
                f.writelines(lines)
        env["HF_DATASETS_CACHE"] = os.path.join(work, "hf_cache")

        def run(num_proc, out_dir, *extra):
            cmd = [sys.executable, "-c", _FINEWEB_CHILD, "--local_files", corpus, "--out_dir", out_dir,
                   "--shard_size", str(args.shard_size), "--num_proc", str(num_proc), *extra]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise UsageError(f"fineweb.py run failed:\n{proc.stderr[-2000:]}")
            return json.loads(proc.stdout.split("BENCH ", 1)[1])

        run(1, os.path.join(work, "warmup"), "--stop_after_shards", "1")  # builds the Arrow cache, untimed
        for r in range(args.repeats):  # interleaved
            for p in procs:
                out = os.path.join(work, f"out_{r}_{p}")
                s = run(p, out)
                results[p].append(s)
                print(f"  round {r + 1} num_proc {p}: {s['tokens'] / s['seconds'] / 1e6:.2f}M tok/s, "
                      f"{s['tokens'] / s['cpu_s'] / 1e6:.2f}M tok/CPU-s, main {s['main_rss'] / 2**20:.0f} MiB, "
                      f"worker {s['worker_rss'] / 2**20:.0f} MiB, all anon {s['tree_anon'] / 2**20:.0f} MiB", flush=True)
                for name in os.listdir(out):
                    os.remove(os.path.join(out, name))

    print(f"fineweb.py, {copies * sample_tokens / 1e6:.1f}M tokens per run, shard_size {args.shard_size:,}, "
          f"{args.repeats} rounds, medians ({os.cpu_count()} cores visible):")
    print(f"{'num_proc':>8} {'tokens/s':>10} {'speedup':>8} {'tok/CPU-s':>10} {'wall s':>7} {'main RSS':>9} "
          f"{'worker RSS':>10} {'all anon':>9}")
    base = None
    for p in procs:
        rs = results[p]
        tps = median([s["tokens"] / s["seconds"] for s in rs])
        base = base or tps
        print(f"{p:>8} {tps / 1e6:>9.2f}M {tps / base:>7.2f}x "
              f"{median([s['tokens'] / s['cpu_s'] for s in rs]) / 1e6:>9.2f}M "
              f"{median([s['wall_s'] for s in rs]):>7.1f} "
              f"{max(s['main_rss'] for s in rs) / 2**20:>7.0f}Mi {max(s['worker_rss'] for s in rs) / 2**20:>8.0f}Mi "
              f"{max(s['tree_anon'] for s in rs) / 2**20:>7.0f}Mi")


# -----------------------------------------------------------------------------
# Command line

MODES = {
    "train": bench_train,
    "memory": bench_memory,
    "allocator": bench_allocator,
    "sample": bench_sample,
    "hellaswag": bench_hellaswag,
    "data": bench_data,
    "fineweb": bench_fineweb,
}
# a small model where the comparison is about the algorithm, not the model (sampling, HellaSwag)
SMALL_MODEL = "d4"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmarks for train_gpt2.py (see the top of bench.py for examples).")
    p.add_argument("--mode", default="train", choices=list(MODES), help="what to measure (default: %(default)s)")
    g = p.add_argument_group("model and shape")
    g.add_argument("--model", default=None, help=f"gpt2, gpt2-medium, ..., or dN (default: gpt2; {SMALL_MODEL} for sample and hellaswag)")
    g.add_argument("--vocab_size", type=int, default=50304, help="ours (default: %(default)s); the Hugging Face model has 50257")
    g.add_argument("--batch_size", type=batch_size_arg, default=None, help="micro-batch B, or sequences sampled at once (default: 4; 16 on a GPU except for sample); 'auto' on CUDA: the largest power of two that fits")
    g.add_argument("--seq_len", type=positive_int, default=None, help="T (default: 256 on CPU, 1024 on GPU)")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu, the default), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="autocast dtype, as in train_gpt2.py (default: auto)")
    g.add_argument("--compile", type=int, default=None, choices=[0, 1], help="torch.compile (default: 1 for train, 0 for memory and allocator)")
    g.add_argument("--loss_chunk_size", type=positive_int, default=None, help="ours: positions per chunk of the chunked loss (default: the model's)")
    g.add_argument("--tune_allocator", type=int, default=1, choices=[0, 1], help="call tune_cpu_allocator() on CPU, as train_gpt2.py does (default: 1)")
    g = p.add_argument_group("train, memory, allocator")
    g.add_argument("--compare", default="none", choices=["none", "hf", "ladder"],
                   help="hf: also Hugging Face's GPT2LMHeadModel in fp32 with torch's default AdamW, and with our settings; "
                        "ladder: ours from fp32 + default AdamW to our defaults, one change at a time (default: none)")
    g.add_argument("--warmup", type=int, default=1, help="untimed steps per variant; the first one compiles (default: 1)")
    g.add_argument("--steps", type=positive_int, default=None, help="timed steps per variant (default: 5 for train; 2 for memory; 3 for allocator)")
    g = p.add_argument_group("sample, hellaswag, data, fineweb, allocator, memory")
    g.add_argument("--repeats", type=positive_int, default=None, help="interleaved repeats of each variant (default: 3; 2 for memory)")
    g.add_argument("--max_new_tokens", type=positive_int, default=256, help="sample: tokens generated per sequence (default: 256)")
    g.add_argument("--data", default=None, help="hellaswag: a local jsonl (default: download the val split); data: a .txt file (default: input.txt); fineweb: a .jsonl (default: ../shared/data/fineweb_sample/fineweb_sample_300.jsonl)")
    g.add_argument("--limit", type=positive_int, default=None, help="hellaswag: the first N examples")
    g.add_argument("--hellaswag_batch_size", type=positive_int, default=16, help="hellaswag: examples per forward when batched (default: 16)")
    g.add_argument("--batches", type=positive_int, default=200, help="data: batches per timing (default: 200)")
    g.add_argument("--seconds", type=float, default=20, help="fineweb: target seconds of a one-process run (default: 20)")
    g.add_argument("--procs", default="1,2", help="fineweb: num_proc values, comma separated (default: 1,2)")
    g.add_argument("--shard_size", type=positive_int, default=10**7, help="fineweb: tokens per shard (default: 10**7)")
    # internal: bench.py running itself in a fresh process
    p.add_argument("--_memory_child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--result_json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    on_gpu = pick_device(args.device).startswith("cuda")
    small = args.mode in ("sample", "hellaswag")
    args.model = args.model or (SMALL_MODEL if small else "gpt2")
    # sample: 4 sequences, as train_gpt2.py --sample (--num_samples 4) and its in-training samples do
    args.batch_size = args.batch_size or (16 if on_gpu and args.mode != "sample" else 4)
    args.seq_len = args.seq_len or (1024 if on_gpu else 256)
    if args.compile is None:
        args.compile = 1 if args.mode == "train" else 0
    if args.repeats is None:
        args.repeats = 2 if args.mode == "memory" else 3
    if args.steps is None:
        args.steps = {"memory": 2, "allocator": 3}.get(args.mode, 5)
    if args.batch_size == "auto" and args.mode != "train":
        p.error("--batch_size auto is for --mode train")
    if args.warmup < 1 and args.mode in ("train", "allocator"):
        p.error("--warmup must be >= 1: the first step compiles and allocates, it is never timed")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        model_config(args.model, args.vocab_size)  # an unknown --model fails here, before any work
        if args._memory_child:
            return memory_child(args)
        on_cpu = pick_device(args.device) == "cpu" or args.mode in ("data", "fineweb")
        if on_cpu and not args.result_json:
            warn_if_busy()
        args.other_load = OtherLoad().start() if on_cpu else None
        MODES[args.mode](args)
        if args.mode != "train" and other_load(args):  # train prints it before its ratio lines, which come last
            print(other_load(args)[2:])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
