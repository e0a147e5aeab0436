"""
What a run reports besides its log.txt lines: progress (step N/M and the time left, a note at start for a run that
will take days), run.json (what the run trains on, which play.ipynb reads beside log.txt), and the live metrics in
TensorBoard (--tensorboard) and Weights & Biases (--wandb). train_gpt2.py calls these by module name; this module
never imports it.
"""

import glob
import json
import os
import sys
import time
from dataclasses import asdict

import torch

import common
from common import UsageError


# -----------------------------------------------------------------------------
# Progress: step N/M with the time left, a note for a run that will take days, run.json


def format_duration(seconds):
    """'45s', '12m05s', '3h20m', '2d04h': two units at most."""
    s = int(round(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{s % size // sub_size:02d}{sub}"
    return f"{s}s"


class StepTimer:
    """The mean time of this process's steps, leaving out its first `skip` (compilation, allocator warm-up); the
    evaluations between steps are not timed."""

    def __init__(self, skip=2):
        self.skip, self.seen, self.total, self.counted = skip, 0, 0.0, 0

    def add(self, dt):
        self.seen += 1
        if self.seen > self.skip:
            self.total += dt
            self.counted += 1

    def eta(self, steps_left):
        """The time the steps left take at the mean so far ('-' before any step counted), for the step line."""
        return format_duration(self.total / self.counted * steps_left) if self.counted else "-"


def matmul_rate(device, dtype):
    """FLOP/s of a square matmul in dtype on device, the best of 3 after a warm-up: this machine's speed now. Large
    enough to keep a GPU busy, small enough to cost a CPU milliseconds; torch.ones leaves the seeded RNG alone."""
    n = 512 if str(device) == "cpu" else 4096
    a = torch.ones(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        (a @ a)[0, 0].item()  # .item() waits for a GPU to finish
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times[1:])


def long_run_note(run, config, steps):
    """One line for a run that will take more than a day, else None: its FLOPs at half the matmul rate measured on
    the device (training reaches about half of it: 66% MFU on a CPU in bench.py, 40-60% on GPUs). The step lines'
    eta, from the steps' own times, then takes over."""
    args = run.args
    flops = common.flops_per_token(config, args.seq_len) * args.total_batch_size * steps
    rate = matmul_rate(run.ctx.device, run.precision) * run.ctx.world_size
    precision = str(run.precision).replace("torch.", "")
    seconds = flops / (0.5 * rate)
    if seconds < 86400:
        return None
    return (f"note: this run will take about {format_duration(seconds)}: {steps} steps of {args.total_batch_size:,} "
            f"tokens at half the {rate / 1e9:,.0f} GFLOP/s that {precision} matmuls reach on {run.ctx.device} x "
            f"{run.ctx.world_size} (the step lines' eta will be closer). A first run on a CPU: README's quickstart, "
            "`python train_gpt2.py --recipe shakespeare`, a small GPT on Tiny Shakespeare in minutes")


def data_kind(data):
    """What --data holds, for run.json: text, fineweb-edu (also shards named as build-nanogpt's fineweb.py names
    them), local files (fineweb.py --local_files), another hub dataset's name, or shards (of unknown origin)."""
    if data.endswith(".txt"):
        return "text"
    try:
        with open(os.path.join(data, "manifest.json")) as f:  # fineweb.py's record of what it tokenized
            settings = json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return "fineweb-edu" if glob.glob(os.path.join(data, "edufineweb_*.npy")) else "shards"
    dataset = settings.get("dataset") or "local files"
    return "fineweb-edu" if dataset == "HuggingFaceFW/fineweb-edu" else dataset


def run_record(args, config, params):
    """What the run trains on and with, for play.ipynb (which draws the GPT-2 baselines only where they apply)."""
    return dict(
        data=args.data, data_kind=data_kind(args.data), init_from=args.init_from,
        model=args.model if args.init_from == "scratch" else args.init_from, arch=config.arch,
        n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, vocab_size=config.vocab_size,
        params=params, recipe=args.recipe, optimizer=args.optimizer, max_steps=args.max_steps,
        total_batch_size=args.total_batch_size, seq_len=args.seq_len,
    )


def write_run_record(log_dir, record):
    """run.json beside log.txt (rewritten by a resumed run): log.txt keeps its `STEP STREAM VALUE` lines only."""
    with open(os.path.join(log_dir, "run.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def record_run(run, start_step):
    write_run_record(run.args.log_dir, run_record(run.args, run.model.config, run.model.num_params()))
    note = long_run_note(run, run.model.config, run.args.max_steps - start_step)
    if note:
        print(note)


# -----------------------------------------------------------------------------
# Live metrics: TensorBoard (--tensorboard) and Weights & Biases (--wandb)
#
# Both off by default; global rank 0 writes, and each package is imported only when its flag asks for it. Step N's
# values are log.txt's step N: the evaluations at N score the model after N steps, the train loss is step N's batch.
# A resumed run continues the same curves. TensorBoard: its writer hides every event at or after the checkpoint's
# step (purge_step), and the resumed run logs them again, the checkpoint step's evaluations included (from log.txt
# and the checkpoint). wandb: the checkpoint keeps the run's id and the resumed run continues that run; the steps
# the server already holds (the interrupted run's after its checkpoint, the same values: resume is exact) are not
# sent again.

EVAL_TAGS = {"val": "val/loss", "hella": "hellaswag/acc_norm"}  # log.txt stream: metric


def lr_group_names(optimizer):
    """A name per param group: adamw0 (matrices and embeddings), adamw1 (biases, gains), muon0 (Muon's matrices)."""
    inner = getattr(optimizer, "optimizers", [optimizer])  # MultiOptimizer: AdamW and Muon
    return [f"{type(opt).__name__.lower()}{i}" for opt in inner for i in range(len(opt.param_groups))]


def run_config(run):
    """The flags and the model config, as the run's hparams / config (numbers, strings and booleans)."""
    flat = {**run.flags(), **{f"model.{k}": v for k, v in asdict(run.model.config).items()}}
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


def open_tensorboard(log_dir, start_step, config):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    # purge_step: an earlier run's events in log_dir at or after start_step are hidden (0: a run started over)
    writer = SummaryWriter(log_dir, purge_step=start_step)
    experiment, session_start, _ = hparams(config, {tag: None for tag in ("train/loss", *EVAL_TAGS.values())})
    writer.file_writer.add_summary(experiment, start_step)
    writer.file_writer.add_summary(session_start, start_step)
    return writer


def open_wandb(args, config, run_id):
    import wandb

    directory = None if "WANDB_DIR" in os.environ else args.log_dir
    try:  # no login, no network, a project name wandb refuses: one line now, not a traceback
        return wandb.init(project=args.wandb, name=args.wandb_run, id=run_id, resume="allow", config=config,
                          dir=directory)
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"--wandb {args.wandb}: wandb could not start the run ({why}); run `wandb login`, or set "
                         "WANDB_MODE=offline") from None


class Metrics:
    """A run's metrics: in log.txt (`STEP STREAM VALUE` lines, which play.ipynb plots), and with --tensorboard and
    --wandb in TensorBoard and wandb; global rank 0 writes, the other ranks' calls do nothing. The MFU is against the
    GPUs' summed tensor-core peak (peak_flops; None where not known: no MFU)."""

    def __init__(self, run, checkpoint=None):
        args, ctx = run.args, run.ctx
        # what the steps' metrics need, not run itself: run holds this object, and a cycle would keep the model (and
        # DDP's gloo threads) alive after train() until the garbage collector runs
        self.optimizer, self.train_loader, self.log_file = run.optimizer, run.train_loader, run.log_file
        self.master, self.tokens_per_step = ctx.master, args.total_batch_size
        self.flops_per_step = common.flops_per_token(run.model.config, args.seq_len) * args.total_batch_size
        self.cuda_device = ctx.device if ctx.device_type == "cuda" else None
        # the peak table holds tensor-core bf16/fp16 peaks: a float32 run has none
        peak = None
        if self.cuda_device and run.precision != torch.float32:
            peak = common.gpu_peak_flops(torch.cuda.get_device_name(ctx.device))
        self.peak_flops = peak * ctx.world_size if peak else None
        self.tb = self.wandb_run = None
        saved = checkpoint.get("metrics", {}) if checkpoint else {}
        self.wandb_id = saved.get("wandb_id")  # kept across resumes, also by runs without --wandb
        self.last_texts = None  # [step, name, texts] of the latest samples, for the checkpoint of their step
        self.first_wandb_step = 0  # steps below it are in the wandb run already
        if not ctx.master or (args.tensorboard is None and args.wandb is None):
            return
        start_step = checkpoint["step"] if checkpoint else 0
        config = run_config(run)
        if args.tensorboard is not None:
            self.tb = open_tensorboard(args.tensorboard or args.log_dir, start_step, config)
        if args.wandb is not None:
            self.wandb_run = open_wandb(args, config, self.wandb_id)
            self.wandb_id, self.first_wandb_step = self.wandb_run.id, self.wandb_run.starting_step
        if start_step:
            self.replay(start_step, saved.get("last_texts"))

    def replay(self, step, last_texts):
        """A resumed run: log the checkpoint step's evaluations again (TensorBoard dropped them with the step's
        other events): the values from log.txt, the samples from the checkpoint."""
        if os.path.exists(self.log_file):
            with open(self.log_file) as f:
                for line in f:
                    s, stream, value = line.split()
                    if int(s) == step and stream in EVAL_TAGS:
                        self.log(step, {EVAL_TAGS[stream]: float(value)})
        if last_texts and last_texts[0] == step:
            self.log_text(*last_texts)

    def write(self, line):
        """Append to log.txt (one write per call: a step's lines stay together)."""
        if self.master:
            with open(self.log_file, "a") as f:
                f.write(line + "\n")

    def log(self, step, values):
        if self.tb:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb_run and step >= self.first_wandb_step:
            self.wandb_run.log(values, step=step)

    def mfu_text(self, dt):
        """' | mfu N%' for the step line of a step of dt seconds, '' where the peak is not known."""
        return f" | mfu {100 * self.flops_per_step / dt / self.peak_flops:.1f}%" if self.peak_flops else ""

    def new_epoch(self, step, epoch):
        common.print0(f"step {step}: epoch {epoch} of the train data begins; the data repeats from here")
        self.write(f"{step} epoch {epoch}")

    def log_step(self, step, loss, lr, norm, dt):
        """After training step `step`: its loss, learning rates, gradient norm, speed, tokens seen and epoch."""
        self.write(f"{step} train {loss:.6f}\n{step} lr {lr:.6e}\n{step} norm {norm:.6f}")
        if not (self.tb or self.wandb_run):
            return
        tokens = self.tokens_per_step
        values = {"train/loss": loss, "train/grad_norm": norm, "train/tokens": (step + 1) * tokens,
                  "train/epoch": self.train_loader.epoch + 1, "perf/step_time_ms": 1000 * dt,
                  "perf/tokens_per_s": tokens / dt}
        for name, group in zip(lr_group_names(self.optimizer), self.optimizer.param_groups):
            values[f"lr/{name}"] = group["lr"]
        if self.peak_flops:
            values["perf/mfu_percent"] = 100 * self.flops_per_step / dt / self.peak_flops
        if self.cuda_device:
            values["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.cuda_device) / 2**30
        self.log(step, values)

    def log_eval(self, step, stream, value):
        """An evaluation, by its log.txt stream (val, hella)."""
        self.write(f"{step} {stream} {value:.4f}")
        self.log(step, {EVAL_TAGS[stream]: value})

    def log_text(self, step, name, texts):
        if not (self.tb or self.wandb_run):
            return
        self.last_texts = [step, name, list(texts)]
        if self.tb:
            self.tb.add_text(name, "\n\n".join(f"    {text}" for text in texts), step)  # indented: shown verbatim
        if self.wandb_run and step >= self.first_wandb_step:
            import wandb

            self.wandb_run.log({name: wandb.Table(columns=["i", "text"], data=list(enumerate(texts)))}, step=step)

    def state(self):
        """What a checkpoint keeps: the wandb run to continue, the samples to show again at its step."""
        return {k: v for k, v in [("wandb_id", self.wandb_id), ("last_texts", self.last_texts)] if v is not None}

    def flush(self):
        """At checkpoints, so that a kill loses at most what follows the checkpoint (TensorBoard writes every 120 s
        otherwise; wandb streams online, and writes an offline run out when it finishes)."""
        if self.tb:
            self.tb.flush()

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb_run:
            self.wandb_run.finish(exit_code=1 if sys.exc_info()[0] else 0)  # called in a finally: an error under way?


