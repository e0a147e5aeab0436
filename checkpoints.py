"""
Checkpoint files: written atomically (a crash or a full disk never leaves a half-written model_*.pt), a failed
write turned into one line that says how to go on, listed, pruned, and checked when read (a foreign or damaged file
is a one-line error, not a traceback), with the flags a run must keep to resume one. What a checkpoint holds is
train_gpt2.py's (save_checkpoint, load_checkpoint); this module never imports it.

A checkpoint is a dict of tensors, numbers, strings and lists only (no pickled classes), so that it loads with
torch.load(weights_only=True): a checkpoint from the internet cannot run code.
"""

import contextlib
import errno
import glob
import os
import re
import warnings

import torch

from common import UsageError


CHECKPOINT_RE = re.compile(r"model_(\d+)\.pt$")


# -----------------------------------------------------------------------------
# Reading: a checkpoint of ours, checked inside


def upgrade(checkpoint):
    """Fill in what older checkpoints lack, with what they meant: no config "arch" (before --arch): gpt2; no
    "lr_decay_steps" (before --extend): their max_steps; no "precision": float16 if GradScaler was on (else it stays
    unknown: bfloat16 or float32). (No "shard_tokens" in a loader state: the loader skips that check.)"""
    if isinstance(checkpoint.get("config"), dict):
        checkpoint["config"].setdefault("arch", "gpt2")
    saved = checkpoint.get("args")
    if isinstance(saved, dict):
        if "max_steps" in saved:
            saved.setdefault("lr_decay_steps", saved["max_steps"])
        if "precision" not in saved and checkpoint.get("scaler"):
            saved["precision"] = "float16"
    return checkpoint


def read(path):
    """The checkpoint dict at path, memory-mapped, with what older checkpoints lack filled in (upgrade)."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file; check the path (checkpoints are {{log_dir}}/model_XXXXX.pt)")
    try:
        # memory-mapped: the pages of the file, shared by the ranks of a node and read only where used
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # not a zip, truncated, or holds pickled objects
        raise UsageError(f"{path} is not a checkpoint written by train_gpt2.py ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(checkpoint, dict) or not {"model", "config", "step"} <= checkpoint.keys():
        raise UsageError(f"{path} is not a checkpoint written by train_gpt2.py (expected a dict with model, config and "
                         "step)")
    return upgrade(checkpoint)


# -----------------------------------------------------------------------------
# Finding and pruning


def list_checkpoints(log_dir):
    """(step, path) of the checkpoints in log_dir, newest first."""
    found = []
    for path in glob.glob(os.path.join(log_dir, "model_*.pt")):
        m = CHECKPOINT_RE.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def prune_checkpoints(log_dir, keep):
    """Keep the newest `keep` checkpoints, and any the user marked by creating model_XXXXX.pt.keep beside it.
    Returns "path (reason)" for each one it could not delete."""
    failed = []
    for _, path in list_checkpoints(log_dir)[keep:]:
        if not os.path.exists(path + ".keep"):
            try:
                os.remove(path)
            except OSError as e:
                failed.append(f"{path} ({e.strerror or e})")
    return failed


# -----------------------------------------------------------------------------
# Writing: atomically, and a failed write said in one line


def os_error_in(e):
    """The OSError behind e, if any: torch.save reports a failed write as a RuntimeError whose __context__ is it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_atomically(checkpoint, path):
    """Write atomically: a crash mid-write leaves the previous checkpoints intact and no half-written model_*.pt;
    a write that fails (disk full, file-size limit, I/O error) leaves no temporary file either."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if os_error_in(e) is not None:  # a failed write; an abort (second Ctrl-C) leaves it, as a killed writer would
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


WRITE_FIXES = {
    errno.ENOSPC: "make room on that disk", errno.EDQUOT: "make room in your disk quota",
    errno.EFBIG: "raise the file-size limit (ulimit -f)", errno.EACCES: "make the directory writable",
    errno.EPERM: "make the directory writable", errno.EROFS: "use a writable --log_dir",
}


def write(checkpoint, log_dir, step, keep):
    """Write log_dir/model_{step}.pt, then keep the newest `keep` checkpoints. Returns None, or the one-line error
    for a checkpoint that could not be written (disk full, file-size limit, I/O error, permissions); the previous
    checkpoints are then left as they are."""
    path = os.path.join(log_dir, f"model_{step:05d}.pt")
    try:
        write_atomically(checkpoint, path)
    except (OSError, RuntimeError) as e:
        cause = os_error_in(e)
        if cause is None:
            raise
        fix = WRITE_FIXES.get(cause.errno, "check that disk")
        done = list_checkpoints(log_dir)
        since = f"the last checkpoint, {os.path.basename(done[0][1])}" if done else "the start (no checkpoint yet)"
        return (f"{path}: cannot write the checkpoint of step {step} ({cause.strerror or cause}); {fix}, then run "
                f"the same command with --resume: it continues from {since}")
    print(f"saved {path}")
    for failed in prune_checkpoints(log_dir, keep):  # the new one is safe: go on
        print(f"warning: cannot delete the old checkpoint {failed}; delete it by hand")
    return None


# -----------------------------------------------------------------------------
# The log of a resumed run


# the streams a step writes after training (its evaluations come before, and before its checkpoint)
STEP_STREAMS = ("train", "lr", "norm", "epoch")


def truncate_log(log_file, step):
    """On resume: keep the log's lines from before the checkpoint's step and its evaluations at that step
    (written before the checkpoint); drop what the interrupted run logged after it."""
    if not os.path.exists(log_file):
        return
    with open(log_file) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        s, stream = int(parts[0]), parts[1]
        if s < step or (s == step and stream not in STEP_STREAMS):
            kept.append(line)
    with open(log_file + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(log_file + ".tmp", log_file)


# -----------------------------------------------------------------------------
# Checking what a checkpoint holds, and what a resumed run must keep


def check_model(checkpoint, path, config_class, model_class):
    """The config must be a config_class (GPTConfig) and the weights exactly the tensors of that model; returns the
    model, built on the meta device (shapes only, no memory)."""
    fix = "pass a checkpoint written by train_gpt2.py"
    config, sd = checkpoint["config"], checkpoint["model"]
    fields = set(config_class.__dataclass_fields__)
    if not isinstance(config, dict) or set(config) != fields:
        raise UsageError(f"{path}: its config is not a GPT config (expected the keys {', '.join(sorted(fields))}); "
                         f"{fix}")
    positive = all(type(v) is int and v > 0 for k, v in config.items() if k != "arch")  # bools are not sizes
    if not positive or config["n_embd"] % config["n_head"]:
        raise UsageError(f"{path}: its config {config} is not a valid GPT config (positive whole numbers, n_embd "
                         f"divisible by n_head); {fix}")
    try:
        with torch.device("meta"):
            model = model_class(config_class(**config))
    except ValueError as e:  # an unknown arch, an odd head size for the modern arch
        raise UsageError(f"{path}: {e}; {fix}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{path}: its model entry is not a dict of tensors; {fix}")
    try:
        with warnings.catch_warnings():  # on the meta device it checks the keys and the shapes and copies nothing
            warnings.filterwarnings("ignore", message=".*to a meta parameter")
            model.load_state_dict(sd)
    except RuntimeError as e:
        # load_state_dict's error lists the missing keys, the unexpected ones and each wrong shape, a line each
        problems = [line.strip()[:200] for line in str(e).splitlines()[1:]]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError(f"{path}: its weights do not fit its config: {' '.join(problems[:3])}{more}; {fix}") from None
    return model


def check_training_state(checkpoint, path, model):
    """--resume also needs the training state: flags, data positions, RNG states and an optimizer for this model."""
    fix = "resume from another checkpoint, or start a new run from its weights with --init_from"
    need = {"optimizer": dict, "args": dict, "train_loader": list, "rng": list}
    bad = [k for k, kind in need.items() if not isinstance(checkpoint.get(k), kind)]
    if bad:
        raise UsageError(f"{path}: holds weights but no training state to resume ({', '.join(bad)} missing or "
                         f"damaged); {fix}")
    ranks = checkpoint.get("world_size", 1)
    per_rank = len(checkpoint["train_loader"]) == ranks and len(checkpoint["rng"]) == ranks
    if not per_rank or "batch_size" not in checkpoint["args"]:
        raise UsageError(f"{path}: its data positions or RNG states do not match its world size {ranks}; {fix}")
    opt = checkpoint["optimizer"]
    parts = opt["optimizers"] if "optimizers" in opt else [opt]  # --optimizer muon: AdamW's and Muon's
    try:
        n_opt = sum(len(g["params"]) for part in parts for g in part["param_groups"])
        # each parameter's first moment (AdamW) or momentum (Muon) has its shape
        state_shapes = sorted(tuple(s["exp_avg" if "exp_avg" in s else "momentum_buffer"].shape)
                              for part in parts for s in part["state"].values())
    except (KeyError, TypeError, AttributeError):
        raise UsageError(f"{path}: its optimizer state is damaged; {fix}") from None
    params = list(model.parameters())
    param_shapes = sorted(tuple(p.shape) for p in params)
    fits = n_opt == len(params) and (not state_shapes or state_shapes == param_shapes)
    if not fits:
        raise UsageError(f"{path}: its optimizer state does not fit its model ({n_opt} tensors for {len(params)} "
                         f"parameters); {fix}")


# flags that decide the model and which tokens each step sees: a run can only resume with the same ones
# --data may change (the loader checks that the shards are the same); these change the run itself
RESUME_MUST_MATCH = ("model", "arch", "vocab_size", "init_from", "batch_size", "seq_len", "total_batch_size", "seed",
                     "shuffle", "optimizer", "schedule")


# flags of the optimization itself: the LR a step gets and how its update is made. Resuming with other values
# would silently move the run to another schedule (a finished 19073-step run resumed with --max_steps 40000
# would jump from min_lr back to 6x min_lr), so they must match; --extend alone changes --max_steps
RESUME_SCHEDULE = ("max_steps", "warmup_steps", "max_lr", "min_lr", "weight_decay", "grad_clip", "decay_frac",
                   "embed_lr", "muon_lr", "muon_momentum", "muon_weight_decay")


def check_resume_compatible(checkpoint, flags, world_size):
    """flags: this run's, as its checkpoints save them (Run.flags(): the command line and the run's precision and
    micro-batch). The schedule and the precision must be the checkpoint's too."""
    saved = checkpoint.get("args", {})
    extend = flags.get("extend", False)

    def differ(names):
        return [f"--{k} {saved[k]} -> {flags[k]}" for k in names if k in saved and saved[k] != flags[k]]

    diffs = differ(RESUME_MUST_MATCH)
    if checkpoint.get("world_size", world_size) != world_size:
        diffs.append(f"world size {checkpoint['world_size']} -> {world_size} (it changes each rank's data)")
    diffs += differ(k for k in RESUME_SCHEDULE if not (k == "max_steps" and extend))
    if extend and flags["max_steps"] < checkpoint["step"]:
        diffs.append(f"--max_steps {flags['max_steps']} is before the checkpoint's step {checkpoint['step']}")
    before, now = saved.get("precision"), flags.get("precision")
    if now and before != now and (before is not None or now == "float16"):
        before = before or "bfloat16 or float32"
        diffs.append(f"precision {before} -> {now} (--dtype {flags['dtype']}; pass --dtype {before})")
    if diffs:
        raise UsageError(f"cannot resume: this run differs from the checkpoint in {'; '.join(diffs)}; use the "
                         "checkpoint's settings (the eval, logging and checkpoint flags may change; --extend to train "
                         "to another --max_steps), or --init_from CKPT to start a new run from its weights")


