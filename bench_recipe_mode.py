"""
bench.py --mode recipe (to be merged into bench.py): train the recipes of train_gpt2.py on the same data, seed and
token budget, and report tokens to reach the gpt2 recipe's final val loss and the time per token.

    python bench_recipe_mode.py                                        # gpt2, gpt2+muon, fast on Tiny Shakespeare, d4
    python bench_recipe_mode.py --variant "lr05=--optimizer muon --muon_lr 0.05" --recipes gpt2
"""

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

# the recipes compared by default: name -> train_gpt2.py flags on top of the common ones
RECIPE_FLAGS = {
    "gpt2": ["--recipe", "gpt2"],
    "gpt2+muon": ["--optimizer", "muon"],
    "gpt2+muon+wsd": ["--optimizer", "muon", "--schedule", "wsd"],
    "fast": ["--recipe", "fast"],
}


def bench_recipe(args):
    """Train each recipe (a subprocess of train_gpt2.py per run) and print its val-loss curve, its time per token and
    `tokens to reach the gpt2 recipe's final val loss: NN%`. Logs: --log_root/<recipe>/log.txt (play.ipynb overlays
    them: LOG_FILE=a/log.txt,b/log.txt). Time per token is measured twice: the median step time of the training run
    itself, and the median of --timing_rounds rounds of short runs of every recipe, interleaved (A, B, C, A, B, C)
    so that load from other programs hits all alike; the ratios to gpt2 are from the interleaved runs.

    Flags it reads (argparse names): data, model, batch_size, seq_len, total_batch_size, max_steps, warmup_steps,
    max_lr, min_lr, val_every, val_steps, seed, dtype, recipes (comma-separated names of RECIPE_FLAGS), variant
    (list of "NAME=train_gpt2 flags", added after the recipes), log_root, timing_rounds, timing_steps.
    The gpt2 recipe must be among the runs: its final val loss is the target."""
    runs = {name: RECIPE_FLAGS[name] for name in args.recipes.split(",") if name}
    for v in args.variant or []:
        name, _, flags = v.partition("=")
        runs[name] = shlex.split(flags)
    if "gpt2" not in runs:
        raise SystemExit("error: --recipes must include gpt2 (its final val loss is the target)")
    common = [
        "--data", args.data, "--model", args.model, "--batch_size", args.batch_size, "--seq_len", args.seq_len,
        "--total_batch_size", args.total_batch_size, "--warmup_steps", args.warmup_steps, "--max_lr", args.max_lr,
        "--min_lr", args.min_lr, "--val_steps", args.val_steps, "--seed", args.seed, "--dtype", args.dtype,
        "--hellaswag_every", 0, "--sample_every", 0, "--checkpoint_every", 0, "--compile", 0, "--device", "cpu",
        "--overwrite",
    ]
    log_root = args.log_root or tempfile.mkdtemp(prefix="bench_recipe_")
    print(f"{args.model}, {args.max_steps} steps x {args.total_batch_size} tokens on {args.data}; logs in {log_root}")
    curves, run_dt = {}, {}
    for name, flags in runs.items():
        log_dir = os.path.join(log_root, name.replace("/", "_"))
        out = train(common + ["--max_steps", args.max_steps, "--val_every", args.val_every, "--log_dir", log_dir] + flags)
        curves[name] = read_val_curve(os.path.join(log_dir, "log.txt"))
        run_dt[name] = statistics.median(step_times(out)[2:] or step_times(out))
        print(f"{name:>16}: final val {curves[name][-1][1]:.4f} | {1e6 * run_dt[name] / args.total_batch_size:.1f} us/token (median step of the run)  [{' '.join(map(str, flags))}]")

    # time per token, interleaved
    timing = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.timing_rounds):
            for name, flags in runs.items():
                out = train(common + ["--max_steps", args.timing_steps, "--val_every", 0, "--log_dir", os.path.join(tmp, "t")] + flags)
                timing[name] += step_times(out)[2:]  # the first steps warm up allocator and caches
    dt = {name: statistics.median(t) if t else run_dt[name] for name, t in timing.items()}

    steps = sorted({s for c in curves.values() for s, _ in c})
    print("\nval loss\n" + f"{'step':>6} {'tokens':>9} " + " ".join(f"{n:>16}" for n in runs))
    for s in steps:
        row = [dict(curves[n]).get(s) for n in runs]
        print(f"{s:>6} {s * args.total_batch_size:>9} " + " ".join(f"{v:>16.4f}" if v is not None else f"{'':>16}" for v in row))
    target = curves["gpt2"][-1][1]
    total_tokens = args.max_steps * args.total_batch_size
    print(f"\ntarget: the gpt2 recipe's final val loss {target:.4f} after {total_tokens} tokens")
    for name in runs:
        s = steps_to_reach(curves[name], target)
        reach = f"{100 * s / args.max_steps:.0f}%" if s is not None else "not reached"
        print(f"{name:>16}: tokens to reach the gpt2 recipe's final val loss: {reach} | {1e6 * dt[name] / args.total_batch_size:.1f} us/token, {dt[name] / dt['gpt2']:.3f}x gpt2's time per token (interleaved, {len(timing[name])} steps)")


def train(flags):
    cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), *map(str, flags)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"error: {shlex.join(cmd)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return p.stdout


def step_times(stdout):
    return [float(ms) / 1000 for ms in re.findall(r"\| dt ([0-9.]+)ms", stdout)]


def read_val_curve(log_file):
    curve = []
    with open(log_file) as f:
        for line in f:
            step, stream, value = line.split()
            if stream == "val":
                curve.append((int(step), float(value)))
    return curve


def steps_to_reach(curve, target):
    """The (fractional) step at which the val curve first reaches target, linear between evaluations; None if never."""
    for (s0, v0), (s1, v1) in zip([curve[0]] + curve, curve):
        if v1 <= target:
            return s1 if v0 == v1 else s0 + (v0 - target) / (v0 - v1) * (s1 - s0)
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=os.path.join(SHARED, "tinyshakespeare", "input.txt"))
    p.add_argument("--model", default="d4")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--total_batch_size", type=int, default=4096)
    p.add_argument("--max_steps", type=int, default=40)
    p.add_argument("--warmup_steps", type=int, default=5)
    p.add_argument("--max_lr", type=float, default=2e-3)
    p.add_argument("--min_lr", type=float, default=2e-4)
    p.add_argument("--val_every", type=int, default=5)
    p.add_argument("--val_steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--recipes", default="gpt2,gpt2+muon,fast", help=f"comma-separated, of {', '.join(RECIPE_FLAGS)}")
    p.add_argument("--variant", action="append", help='"NAME=train_gpt2.py flags": one more run (repeatable)')
    p.add_argument("--log_root", default=None, help="a log dir per recipe goes here (default: a new temporary dir)")
    p.add_argument("--timing_rounds", type=int, default=2)
    p.add_argument("--timing_steps", type=int, default=5)
    bench_recipe(p.parse_args(argv))


if __name__ == "__main__":
    main()
