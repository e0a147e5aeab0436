"""
bench.py --mode memory --procs N [--fsdp]: memory per rank of DDP and FSDP side by side (issue 14).

bench_memory_procs(args) is meant to move into bench.py; the __main__ block below only lets it run on its own:

    python bench_fsdp_mode.py --model gpt2 --procs 2 --batch_size 2 --seq_len 128
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

# one rank of the benchmark: train_gpt2's own model, wrapping (DDP or FSDP), optimizer and train_step
_MEMORY_WORKER = r"""
import json, os, resource, sys
import torch
import torch._dynamo  # before the process group, as in setup_distributed
import train_gpt2 as tg

cfg = json.loads(sys.argv[1])
rss_kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ctx = tg.setup_distributed(cfg["device"])
base = rss_kib()
torch.manual_seed(0)
dtype = tg.pick_dtype(cfg["dtype"], ctx.device_type)
model = tg.GPT(tg.model_config(cfg["model"])).to(ctx.device)
args = type("Args", (), {"compile": 0})()
if cfg["fsdp"]:
    train_model, dtype = tg.shard_model(model, args, ctx, dtype)
else:
    train_model = tg.wrap_model(model, args, ctx)
optimizer = model.configure_optimizers(0.1, 6e-4, ctx.device_type)
scaler = torch.amp.GradScaler(ctx.device_type, enabled=dtype == torch.float16)

class RandomBatches:
    def __init__(self, B, T):
        self.g = torch.Generator().manual_seed(ctx.rank)
        self.B, self.T = B, T
    def next_batch(self):
        x = torch.randint(0, tg.GPT2_VOCAB, (self.B, self.T + 1), generator=self.g)
        return x[:, :-1], x[:, 1:]

loader = RandomBatches(cfg["batch_size"], cfg["seq_len"])
for _ in range(cfg["steps"]):
    tg.train_step(train_model, optimizer, scaler, loader, cfg["accum"], ctx, dtype, 6e-4, 1.0)
state = tg.state_bytes_per_rank(model, optimizer)
cuda_peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device_type == "cuda" else None
result = dict(rank=ctx.rank, base_rss=base * 1024, peak_rss=rss_kib() * 1024, cuda_peak=cuda_peak, **state)
with open(f"{cfg['out']}.{ctx.rank}", "w") as f:  # a file per rank: their stdout lines can interleave
    json.dump(result, f)
torch.distributed.destroy_process_group()
"""


def bench_memory_procs(args):
    """Memory per rank of DDP and FSDP, side by side, each under torchrun with args.procs processes: the bytes of
    parameters, gradients and AdamW state that one rank holds (counted from its tensors, after a few training
    steps), and its peak RSS (and peak CUDA memory on GPUs). The variants run interleaved, args.repeats times each.

    argparse flags it reads (bench.py):
      --procs N        processes (ranks) per run (default 2)
      --model          gpt2, gpt2-medium, ..., dN (default gpt2)
      --batch_size B   micro-batch per rank (default 2)
      --seq_len T      (default 128)
      --accum K        micro-steps per optimizer step (default 1; with K > 1 FSDP holds unsharded gradients
                       between micro-steps, see gradient_sync, so its peak grows by a full gradient)
      --steps S        optimizer steps before measuring (default 2)
      --repeats R      runs per variant (default 1; the state bytes are exact, the RSS varies a little)
      --device         cpu (gloo) or cuda (NCCL, one GPU per rank)
      --dtype          auto, float32, bfloat16 (as in train_gpt2.py)
      --fsdp           (accepted for `--mode memory --procs 2 --fsdp`; DDP is always measured beside it)
    """
    procs = getattr(args, "procs", None) or 2
    cfg = dict(
        model=args.model or "gpt2", batch_size=args.batch_size if isinstance(args.batch_size, int) else 2,
        seq_len=args.seq_len or 128, accum=getattr(args, "accum", None) or 1, steps=getattr(args, "steps", None) or 2,
        device=args.device if args.device != "auto" else "cpu", dtype=args.dtype or "auto",
    )
    repeats = getattr(args, "repeats", None) or 1
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    results = {"DDP": [], "FSDP": []}
    with tempfile.TemporaryDirectory() as tmp:
        worker = os.path.join(tmp, "memory_worker.py")
        with open(worker, "w") as f:
            f.write(_MEMORY_WORKER)
        for _ in range(repeats):
            for name in results:  # interleaved: DDP, FSDP, DDP, FSDP, ...
                out = os.path.join(tmp, f"{name}{len(results[name])}")
                c = json.dumps(dict(cfg, fsdp=name == "FSDP", out=out))
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", worker, c]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                ranks = [json.load(open(f"{out}.{r}")) for r in range(procs) if os.path.exists(f"{out}.{r}")]
                if p.returncode != 0 or len(ranks) != procs:
                    raise RuntimeError(f"{name} run failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
                results[name].append(ranks)
    print(f"memory per rank: {cfg['model']}, {procs} ranks on {cfg['device']}, B={cfg['batch_size']} T={cfg['seq_len']} "
          f"x {cfg['accum']} micro-steps, after {cfg['steps']} steps, dtype {cfg['dtype']}; median of {repeats} run(s), "
          f"max over ranks; RSS on a shared machine varies with its load")
    mib = lambda b: b / 2**20  # noqa: E731
    keys = ["parameters", "gradients", "optimizer"]
    rows = {}
    for name, runs in results.items():
        row = {k: statistics.median(max(r[k] for r in ranks) for ranks in runs) for k in keys}
        row["sharded total"] = sum(row[k] for k in keys)
        row["peak RSS"] = statistics.median(max(r["peak_rss"] for r in ranks) for ranks in runs)
        row["RSS over start"] = statistics.median(max(r["peak_rss"] - r["base_rss"] for r in ranks) for ranks in runs)
        if runs[0][0]["cuda_peak"] is not None:
            row["peak CUDA"] = statistics.median(max(r["cuda_peak"] for r in ranks) for ranks in runs)
        rows[name] = row
    cols = list(rows["DDP"])
    print(f"{'MiB per rank':<16}" + "".join(f"{c:>16}" for c in cols))
    for name, row in rows.items():
        print(f"{name:<16}" + "".join(f"{mib(row[c]):>16.1f}" for c in cols))
    print(f"{'FSDP / DDP':<16}" + "".join(f"{rows['FSDP'][c] / rows['DDP'][c]:>16.3f}" for c in cols))
    return rows


if __name__ == "__main__":  # standalone use until it moves into bench.py
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--fsdp", action="store_true")
    bench_memory_procs(p.parse_args())
