"""
Input checks: the flags and the input files (text, token shards, Hugging Face directories, output directories),
checked before any work starts, each mistake a one-line UsageError that names the problem and the fix.
train_gpt2.py calls these by module name; this module never imports it.
"""

import argparse
import importlib.util
import json
import os
import urllib.request

import numpy as np
import torch.distributed as dist

import common
import hellaswag
import sharding
from common import GPT2_VOCAB, UsageError


SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


# -----------------------------------------------------------------------------
# Input files


def ensure_text_data(path):
    """--data input.txt is Tiny Shakespeare: download it on first use."""
    if os.path.exists(path) or os.path.basename(path) != "input.txt":
        return
    print(f"downloading Tiny Shakespeare to {path}")
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=60) as r:
            data = r.read()
    except OSError as e:
        raise UsageError(f"could not download Tiny Shakespeare from {SHAKESPEARE_URL} ({e}); download it yourself to "
                         f"{path}, or `git checkout input.txt` in the repository") from None
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"{path}: cannot write the download there ({e.strerror or e}); pass --data with a writable "
                         "path") from None


def check_data_path(data_root):
    """--data: a .txt file that exists, or a directory (of shards)."""
    if str(data_root).endswith(".txt"):
        if not os.path.exists(data_root):
            raise UsageError(f"{data_root}: no such file; check the path (input.txt is part of the repository)")
        return
    if os.path.isfile(data_root):
        raise UsageError(f"{data_root}: a file, but --data takes a directory of .npy token shards or a .txt file; "
                         f"tokenize it with `python fineweb.py --local_files {data_root}` and pass that --out_dir")
    if not os.path.isdir(data_root):
        raise UsageError(f"data directory {data_root} does not exist: run `python fineweb.py` to make the FineWeb-Edu "
                         "shards, or pass --data input.txt for a small run")


def check_run_inputs(args, ctx):
    """What a training run reads besides its model, ready before any work: Tiny Shakespeare downloaded
    (rank 0, the others wait), the GPT-2 tokenizer (offline without tiktoken's cache: one line now, not a traceback
    at the first sample), and --data's path."""
    if args.data.endswith(".txt"):
        if ctx.master:
            ensure_text_data(args.data)
        if ctx.ddp:
            dist.barrier()
    if args.sample_every or args.hellaswag_every:
        common.gpt2_tokenizer()
    check_data_path(args.data)


def check_hellaswag_data(args):
    """HellaSwag downloaded and tokenized at start (a bad file fails now, not hours in)."""
    if args.hellaswag_every:
        try:
            hellaswag.load_examples(data=args.hellaswag_data)
        except (OSError, ValueError) as e:
            raise UsageError(f"--hellaswag_data: {e}") from None


def read_text_file(path):
    """The text of a --data .txt file, or a UsageError that says what is wrong with it."""
    if os.path.isdir(path):
        raise UsageError(f"{path}: a directory, not a text file; pass a .txt file, or a directory of shards without "
                         "the .txt name")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); convert it to "
                         "UTF-8 (e.g. iconv -t utf-8)") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e}); check the path and its permissions") from None
    if not text.strip():
        raise UsageError(f"{path}: the file is empty; pass a text file with something to train on")
    return text


def check_shard(path, vocab_size=GPT2_VOCAB):
    """Memory-map a token shard after checking it is what fineweb.py writes: a 1-D uint16 .npy of token ids below
    vocab_size. The id check is one vectorized max over the shard, read once."""
    fix = "remake the shards with `python fineweb.py`, or move this file out of the --data directory"
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
    if magic != b"\x93NUMPY":  # np.load would try it as a pickle and talk about allow_pickle
        raise UsageError(f"{path}: not a .npy file (no .npy header); {fix}")
    try:
        # a memory map reads only the pages a batch touches, instead of copying a 200 MB shard at each switch
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # not .npy, truncated, object arrays (pickles), unreadable
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{path}: not a token shard ({reason}); {fix}") from None
    if not isinstance(tokens, np.ndarray):  # np.load opens a .npz archive as a dict-like
        raise UsageError(f"{path}: an .npz archive, not a .npy token shard; {fix}")
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UsageError(f"{path}: a {tokens.ndim}-D {tokens.dtype} array, not the 1-D uint16 tokens of a shard; {fix}")
    if tokens.size == 0:
        raise UsageError(f"{path}: the shard holds no tokens; {fix}")
    top = int(tokens.max())
    if top >= vocab_size:
        raise UsageError(f"{path}: holds token id {top}, outside GPT-2's vocabulary of {vocab_size} (not GPT-2 "
                         f"tokens?); {fix}")
    return tokens


# -----------------------------------------------------------------------------
# Flags


def positive_int(value):
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def batch_size_arg(value):
    if value == "auto":
        return value
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; use a whole number >= 1 or 'auto'") from None


def check_output_dir(path, flag):
    """A directory the program will write: it must be a directory (or creatable as one) that we can write."""
    target = os.path.abspath(path)
    while not os.path.exists(target):  # the nearest part of the path that exists
        target = os.path.dirname(target)
    if not os.path.isdir(target):
        where = "it is a file" if target == os.path.abspath(path) else f"{target} is a file"
        raise UsageError(f"{path}: {flag} must be a directory, but {where}; pass another {flag}")
    if not os.access(target, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: {flag} is not writable ({target} is read-only for this user); pass another {flag}")


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_hf_dir(path, accepted):
    """A local Hugging Face directory must hold a GPT-2 or NanoChat config and weights; found here, not deep in
    transformers. Returns its model_type."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path}: no config.json, so it is not a Hugging Face model directory; {accepted}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path}: not a readable JSON config ({e}); re-export the model or pass another "
                         "directory") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in ("gpt2", "nanochat"):
        raise ValueError(f"{path}: a {kind!r} model, not GPT-2 or NanoChat (config.json model_type must be 'gpt2' or "
                         "'nanochat'); pass a Hugging Face GPT-2 model, or a NanoChat one of --arch modern")
    if not any(os.path.isfile(os.path.join(path, name)) for name in HF_WEIGHTS):
        raise ValueError(f"{path}: no weights ({' or '.join(HF_WEIGHTS[::2])}); copy the model's weights file there "
                         "too")
    return kind


# the files GPT.save_pretrained writes: --export may replace these, and nothing else, in an existing directory
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja"}


def check_export_dir(path):
    """--export writes a Hugging Face directory: refuse to mix it into, or overwrite, a directory of other files."""
    check_output_dir(path, "--export")
    if os.path.isdir(path):
        others = sorted(set(os.listdir(path)) - EXPORT_FILES)
        if others:
            raise UsageError(f"{path}: --export directory already holds other files ({', '.join(others[:3])}); pass a "
                             "new or empty directory")


# the numeric flags' ranges, checked in this order: flag -> (the range in words, the check); None (unset) passes
FLAG_RANGES = {
    **dict.fromkeys(["seq_len", "total_batch_size", "val_tokens", "keep_checkpoints", "num_samples", "val_steps"],
                    (">= 1", lambda v: v >= 1)),
    **dict.fromkeys(["max_steps", "warmup_steps", "val_every", "hellaswag_every", "sample_every", "checkpoint_every",
                     "max_new_tokens", "loss_chunk_size", "top_k", "temperature"], (">= 0", lambda v: v >= 0)),
    "decay_frac": ("between 0 and 1", lambda v: 0 <= v <= 1),
    **dict.fromkeys(["muon_lr", "max_lr", "embed_lr"], ("> 0", lambda v: v > 0)),
    "muon_momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
}


def check_seq_len(T, block_size):
    if T > block_size:
        raise UsageError(f"--seq_len {T} is longer than the model's block_size {block_size}")


def check_batch(total_batch_size, B, T, world_size):
    """Gradient accumulation needs the total batch to be a whole number of micro-batches B x T on every rank."""
    if total_batch_size % (B * T * world_size):
        raise UsageError(f"--total_batch_size {total_batch_size} is not a multiple of batch_size*seq_len*world_size = "
                         f"{B}*{T}*{world_size} = {B * T * world_size}")


def check_metrics_packages(args):
    """--tensorboard and --wandb need their package where the metrics are written (global rank 0)."""
    if os.environ.get("RANK", "0") != "0":
        return
    for package in ("tensorboard", "wandb"):  # each flag is named after the package it needs
        if getattr(args, package) is not None and importlib.util.find_spec(package) is None:
            raise UsageError(f"--{package}: the {package} package is not installed; pip install {package}")


def check_args(args, block_size=None):
    """Mistakes that need no data or model to find, caught before any work starts. block_size: that of the model
    --model names (None: the model comes from --init_from)."""
    for name, (allowed, ok) in FLAG_RANGES.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            deprecated = " (and it is deprecated: use --val_tokens)" if name == "val_steps" else ""
            raise UsageError(f"--{name} must be {allowed}, got {value}{deprecated}")
    if args.vocab_size < GPT2_VOCAB:
        raise UsageError(f"--vocab_size {args.vocab_size} is smaller than the GPT-2 tokenizer's {GPT2_VOCAB} tokens")
    if block_size is not None:
        check_seq_len(args.seq_len, block_size)
    if args.batch_size != "auto":
        check_batch(args.total_batch_size, args.batch_size, args.seq_len, 1)  # the world size is checked later
    if args.extend and not args.resume:
        raise UsageError("--extend continues a run: pass it with --resume")
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.fsdp and not under_torchrun and args.sample is None and not args.export:
        raise UsageError("--fsdp shards the model over the processes of a torchrun launch: run `torchrun --standalone "
                         "--nproc_per_node=N train_gpt2.py --fsdp ...`, or drop --fsdp")
    if args.fsdp:
        sharding.fsdp_api()  # an old torch: said now, not after the model is built
    if args.fsdp and args.optimizer == "muon":  # Newton-Schulz needs each whole matrix; FSDP leaves a rank a slice
        raise UsageError("--optimizer muon does not run under --fsdp yet (it orthogonalizes whole matrices, FSDP "
                         "shards them): use DDP (drop --fsdp) or --optimizer adamw")
    if (args.sample is not None or args.export) and args.init_from == "scratch":
        raise UsageError("--sample and --export need a trained model: pass --init_from (gpt2, a Hugging Face "
                         "directory, or log/model_XXXXX.pt)")
    if args.export:
        check_export_dir(args.export)
    elif args.sample is None:  # training writes log.txt and checkpoints
        check_output_dir(args.log_dir, "--log_dir")
        if args.tensorboard:
            check_output_dir(args.tensorboard, "--tensorboard")
        check_metrics_packages(args)


