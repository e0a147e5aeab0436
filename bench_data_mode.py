"""bench_data(args): DataLoaderLite's time per batch in order and with --shuffle (issue 13), to move into bench.py as
`--mode data`. Standalone until then: python bench_data_mode.py [--batch_size 64 --seq_len 1024 ...]"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from train_gpt2 import GPT2_VOCAB, DataLoaderLite, flops_per_token, gpu_peak_flops, model_config, pick_device, positive_int


def bench_data(args):
    """Time per batch of DataLoaderLite, in order and --shuffle (random windows of memory-mapped shards), next to
    the time of one training micro-step of --model at the same B x T (its FLOPs at the measured matmul peak of
    --device: a lower bound on the step, so the loader's share printed is an upper bound).

    The shards are written (random uint16 tokens) into --data_dir (default: a temporary directory). Each repeat
    first evicts them from the page cache (posix_fadvise DONTNEED), so 'cold' reads come from the disk as a fresh
    run's would, then times the same number of batches again with the pages cached ('warm'). Variants interleave.
    Between batches it sleeps --gap_ms, standing in for the micro-step (when the OS reads ahead: --shuffle asks it
    to fetch the next window); only next_batch is timed.

    argparse flags it needs: --model (gpt2), --vocab_size (50304), --batch_size (64), --seq_len (1024), --device
    (auto), --batches (100: per timing), --gap_ms (20), --repeats (5), --shards (4), --shard_tokens (100_000_000, as fineweb.py
    writes), --data_dir (None).
    """
    B, T = args.batch_size, args.seq_len
    tmp = None
    root = args.data_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = tmp.name
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(args.shards):
        path = os.path.join(root, f"bench_train_{i:06d}.npy")
        if not os.path.exists(path) or np.load(path, mmap_mode="r").shape != (args.shard_tokens,):
            np.save(path, rng.integers(0, GPT2_VOCAB, args.shard_tokens, dtype=np.uint16))
        paths.append(path)

    def evict():
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def time_batches(loader, n):
        total = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            x, y = loader.next_batch()
            total += time.perf_counter() - t0
            time.sleep(args.gap_ms / 1000)  # the GPU's work on the batch, while the OS reads ahead
        return total / n

    loaders = {
        "in order": DataLoaderLite(B, T, split="train", data_root=root),
        "--shuffle": DataLoaderLite(B, T, split="train", data_root=root, shuffle=True, seed=1337),
    }
    times = {(name, cache): [] for name in loaders for cache in ("cold", "warm")}
    for _ in range(args.repeats):
        for name, loader in loaders.items():
            state = loader.state_dict()
            evict()
            times[(name, "cold")].append(time_batches(loader, args.batches))
            loader.load_state_dict(state)  # the same batches again, now cached
            times[(name, "warm")].append(time_batches(loader, args.batches))

    # the fastest a micro-step of this shape can be: its FLOPs at the device's measured matmul peak
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") or device == "cpu" else torch.float32
    n = 4096 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    peaks = []
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        peaks.append(10 * 2 * n**3 / (time.perf_counter() - t0))
    peak = max(peaks)
    config = model_config(args.model, args.vocab_size)
    step_floor = flops_per_token(config, T) * B * T / peak

    shard_mb = args.shard_tokens * 2 / 2**20
    print(f"bench data: DataLoaderLite B={B}, T={T} ({B * T * 2 / 1024:.0f} KiB a batch) over {args.shards} shards of "
          f"{args.shard_tokens:,} tokens ({shard_mb:.0f} MiB) in {root}; {args.repeats} interleaved repeats of {args.batches} batches, {args.gap_ms:g} ms apart")
    h100_floor = flops_per_token(config, T) * B * T / gpu_peak_flops("H100")  # H100 SXM, dense bf16, 100% MFU
    print(f"{'':28s} {'median':>10s} {'min':>10s} {'max':>10s}   share of a micro-step: here, on an H100")
    for (name, cache), ts in times.items():
        med = statistics.median(ts)
        print(f"{name + ', ' + cache + ' pages':28s} {med * 1e6:8.1f}us {min(ts) * 1e6:8.1f}us {max(ts) * 1e6:8.1f}us   "
              f"{100 * med / step_floor:10.2g}% {100 * med / h100_floor:10.2g}%")
    for cache in ("cold", "warm"):
        ratio = statistics.median(times[("--shuffle", cache)]) / statistics.median(times[("in order", cache)])
        print(f"--shuffle / in order, {cache}: {ratio:.2f}x")
    print(f"(a --model {args.model} micro-step of {B} x {T} takes at least {step_floor * 1000:.1f} ms on {device}: its "
          f"{flops_per_token(config, T) * B * T / 1e12:.2f} TFLOP at the measured {peak / 1e12:.1f} TFLOP/s {str(dtype).split('.')[-1]} matmul peak; "
          f"on an H100 SXM at least {h100_floor * 1000:.1f} ms, at its {gpu_peak_flops('H100') / 1e12:.0f} TFLOP/s bf16 datasheet peak)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=bench_data.__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--vocab_size", type=int, default=50304)
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--seq_len", type=positive_int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", type=positive_int, default=100, help="batches per timing")
    p.add_argument("--gap_ms", type=float, default=20, help="sleep between batches: the micro-step the loader feeds (0: back to back)")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--shards", type=positive_int, default=4)
    p.add_argument("--shard_tokens", type=positive_int, default=100_000_000, help="tokens per shard (fineweb.py writes 100M)")
    p.add_argument("--data_dir", default=None, help="where the shards go (default: a temporary directory)")
    bench_data(p.parse_args())
