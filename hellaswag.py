"""
HellaSwag evaluation for GPT-2 style models: hub models, local Hugging Face dirs (GPT-2, or NanoChat as
train_gpt2.py --arch modern exports), our checkpoints.

https://github.com/rowanz/hellaswag
Each example is a context and 4 possible endings; one is right. We score "completion style", as the
GPT-2/GPT-3 papers and build-nanogpt do: feed context + " " + ending for each ending and pick the
ending whose tokens get the lowest cross-entropy. acc picks by the sum of the per-token losses,
acc_norm by their mean (so long endings are not punished for being long).
Published numbers for this method on the whole val split (10042 examples), from build-nanogpt:
    gpt2 (124M)     acc: 0.2859  acc_norm: 0.2955
    gpt2-xl (1558M) acc: 0.3842  acc_norm: 0.4893
(EleutherAI's harness scores "multiple choice style" and reports higher numbers: don't mix them.)

Several examples share one forward pass: rows are right-padded, and with causal attention padding
never changes the logits of the real positions, so batched predictions are the one-at-a-time ones.

    python hellaswag.py -m gpt2 -d cuda
    python hellaswag.py -m log/model_19072.pt --limit 1000
    python hellaswag.py -m ./my_hf_dir --data hellaswag_val.jsonl --batch_size 32

train_gpt2.py calls evaluate(model, device, ...) during training, split across the DDP ranks.
"""
import argparse
import contextlib
import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import GPT2_VOCAB

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"


# -----------------------------------------------------------------------------
# data

def default_cache_dir():
    """Where downloaded splits live: $HELLASWAG_CACHE, else hellaswag/ next to this file."""
    return Path(os.environ.get("HELLASWAG_CACHE") or Path(__file__).resolve().parent / "hellaswag")


def check_split(split):
    if split == "test":
        raise ValueError("the HellaSwag test split has no labels (it is scored by the leaderboard): "
                         "use --split val (10042 examples) or --split train")
    if split not in ("val", "train"):
        raise ValueError(f"unknown split {split!r}: use val or train")


def download(split="val", cache_dir=None):
    """Path of the split's jsonl in the cache dir, downloaded from rowanz/hellaswag if missing."""
    check_split(split)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache_dir / f"hellaswag_{split}.jsonl"
    if path.is_file():
        return path
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, or a read-only place
        raise ValueError(f"{cache_dir}: cannot use it as the HellaSwag cache directory ({e.strerror or e}); "
                         "pass another --cache_dir (or HELLASWAG_CACHE)") from None
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise ValueError(f"{cache_dir}: the HellaSwag cache directory is not writable; "
                         "pass another --cache_dir (or HELLASWAG_CACHE)")
    url = DATA_URL.format(split=split)
    # a temp file of its own for each download: ranks may download at once, also ranks of several nodes into a
    # shared cache, where two of them can have the same pid. os.replace is atomic, so an interrupted download
    # never leaves a truncated file that looks like a cached split
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f"{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp's file is private; the cached split is for every user of the cache
    print(f"downloading {url} -> {path}")
    try:
        with open(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, f)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise ValueError(f"could not download {url} ({e}); download it yourself and pass the file "
                         "(hellaswag.py --data FILE, train_gpt2.py --hellaswag_data FILE)") from None
    return path


def check_example(example, where):
    """Raise ValueError naming file:line if a row is not a usable HellaSwag example."""
    if not isinstance(example, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(example).__name__}")
    for key in ("ctx", "endings", "label"):
        if key not in example:
            hint = " (the test split has no labels)" if key == "label" else ""
            raise ValueError(f"{where}: missing key {key!r}{hint}")
    endings, label = example["endings"], example["label"]
    if not isinstance(example["ctx"], str):
        raise ValueError(f"{where}: 'ctx' must be a string")
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        raise ValueError(f"{where}: 'endings' must be a list of 4 strings")
    if isinstance(label, str) and label.isdigit():  # some exports store the label as "3"
        label = example["label"] = int(label)
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < 4):
        raise ValueError(f"{where}: 'label' must be 0, 1, 2 or 3, got {label!r}")


def check_data_file(path):
    if path.is_dir():
        raise ValueError(f"{path}: a directory, not a HellaSwag jsonl file; pass the .jsonl file itself")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")


def iterate_examples(split="val", data=None, cache_dir=None):
    """Yield the examples (dicts) of `data` (a local jsonl) or else of the downloaded split."""
    path = Path(data) if data is not None else download(split, cache_dir)
    check_data_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    example = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                check_example(example, f"{path}:{lineno}")
                yield example
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; pass HellaSwag's jsonl (UTF-8)") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e}); check the path and its permissions") from None


def render_example(example):
    """
    Returns (data, tokens, mask, label):
      tokens (4, T) int64: context tokens then " " + ending tokens, one row per ending, right-padded with 0
      mask   (4, T) int64: 1 on the ending tokens (the ones we score), 0 on context and padding
      data: dict with label, ctx_tokens, ending_tokens (lists of ints)
    """
    enc = common.gpt2_tokenizer()
    ctx_tokens = enc.encode(example["ctx"])
    # GPT-2's BPE attaches the space to the word after it, so the space goes with the ending
    ending_tokens = [enc.encode(" " + ending) for ending in example["endings"]]
    T = len(ctx_tokens) + max(len(end) for end in ending_tokens)
    tokens = torch.zeros((4, T), dtype=torch.long)
    mask = torch.zeros((4, T), dtype=torch.long)
    for i, end in enumerate(ending_tokens):
        n = len(ctx_tokens) + len(end)
        tokens[i, :n] = torch.tensor(ctx_tokens + end)
        mask[i, len(ctx_tokens):n] = 1
    data = {"label": example["label"], "ctx_tokens": ctx_tokens, "ending_tokens": ending_tokens}
    return data, tokens, mask, example["label"]


_loaded = {}  # the in-loop eval runs every N steps: tokenize the file once per process


def load_examples(split="val", data=None, cache_dir=None, limit=None):
    """The rendered examples [(tokens, mask, label)] of a file, in file order, the first `limit` of them."""
    path = Path(data) if data is not None else download(split, cache_dir)
    check_data_file(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = [render_example(ex)[1:] for ex in iterate_examples(data=path)]
    return _loaded[key][:limit]


# -----------------------------------------------------------------------------
# scoring

def _fit(tokens, mask, block_size):
    """Rows longer than the model's context keep their last block_size tokens (context cut on the left)."""
    out_t = torch.zeros((4, block_size), dtype=tokens.dtype)
    out_m = torch.zeros((4, block_size), dtype=mask.dtype)
    for r in range(4):
        n = int(mask[r].nonzero().max()) + 1  # the ending is at the end of the row
        start = max(0, n - block_size)
        out_t[r, :n - start], out_m[r, :n - start] = tokens[r, start:n], mask[r, start:n]
    return out_t, out_m


@torch.no_grad()
def score_rows(model, tokens, mask, autocast_dtype=None):
    """
    Per-row sum and mean of the cross-entropy over the masked (ending) tokens.
    tokens, mask: (R, T) on the model's device; rows with an empty mask are ignored (mean is nan).
    """
    if autocast_dtype is None:
        ctx = contextlib.nullcontext()
    else:
        ctx = torch.autocast(device_type=tokens.device.type, dtype=autocast_dtype)
    # logits at t predict token t+1; only the ending tokens are scored, so the model computes only
    # their logits (the lm_head over all positions would be most of a small model's work)
    targets = tokens[:, 1:]
    scored = mask[:, 1:].bool()
    positions = torch.zeros_like(mask, dtype=torch.bool)
    positions[:, :-1] = scored
    with ctx:
        picked = model.logits_at(tokens, positions)
    picked = picked[:, :GPT2_VOCAB].float()  # a padded vocab's extra ids are never real tokens
    losses = torch.zeros(targets.shape, dtype=torch.float32, device=tokens.device)
    losses[scored] = F.cross_entropy(picked, targets[scored], reduction="none")
    sum_loss = losses.sum(dim=1)  # a dense per-row sum: deterministic, unlike a scatter-add on GPU
    return sum_loss, sum_loss / scored.sum(dim=1)


def predict(model, device, examples, *, batch_size=16, autocast_dtype=None, progress=False):
    """
    Predictions for rendered examples [(tokens, mask, label)]: (pred, pred_norm, labels), int64 tensors
    in input order; pred minimizes the summed loss (acc), pred_norm the mean loss (acc_norm).
    """
    block_size = model.config.block_size
    n = len(examples)
    pred = torch.zeros(n, dtype=torch.long)
    pred_norm = torch.zeros(n, dtype=torch.long)
    labels = torch.tensor([label for _, _, label in examples], dtype=torch.long)
    # longest first: similar lengths share a batch (little padding), and a batch that is too big
    # for memory fails at once, not at the end
    order = sorted(range(n), key=lambda i: -examples[i][0].size(1))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    bar = tqdm(total=n, desc="hellaswag", unit="ex", disable=not progress)
    # one autocast region for all batches: the weights are cast to autocast_dtype once, not at every forward
    autocast = contextlib.nullcontext()
    if autocast_dtype is not None:
        autocast = torch.autocast(torch.device(device).type, dtype=autocast_dtype)
    with autocast:
        for batch in batches:
            T = max(min(examples[i][0].size(1), block_size) for i in batch)
            tokens = torch.zeros((4 * len(batch), T), dtype=torch.long)
            mask = torch.zeros_like(tokens)
            for j, i in enumerate(batch):
                t, m, _ = examples[i]
                if t.size(1) > block_size:
                    t, m = _fit(t, m, block_size)
                tokens[4 * j:4 * j + 4, :t.size(1)] = t
                mask[4 * j:4 * j + 4, :m.size(1)] = m
            sum_loss, mean_loss = score_rows(model, tokens.to(device), mask.to(device))
            idx = torch.tensor(batch)
            pred[idx] = sum_loss.view(-1, 4).argmin(dim=1).cpu()
            pred_norm[idx] = mean_loss.view(-1, 4).argmin(dim=1).cpu()
            bar.update(len(batch))
    bar.close()
    return pred, pred_norm, labels


def evaluate(model, device, *, data=None, split="val", rank=0, world_size=1, batch_size=16, limit=None,
             autocast_dtype=None, progress=False):
    """
    HellaSwag on `model` (our GPT, unwrapped: it is scored with model.logits_at).
    The caller puts the model in eval mode. Examples i with i % world_size == rank are this rank's; with
    torch.distributed initialized the counts are summed over ranks, so every rank gets the totals.
    data: a local jsonl, else `split` is downloaded into the cache dir. limit: the first N examples.
    Returns (num_correct, num_correct_norm, num_total).
    """
    examples = load_examples(split, data=data, limit=limit)
    mine = examples[rank::world_size]
    pred, pred_norm, labels = predict(model, device, mine, batch_size=batch_size, autocast_dtype=autocast_dtype,
                                      progress=progress)
    counts = torch.tensor([(pred == labels).sum().item(), (pred_norm == labels).sum().item(), len(mine)],
                          dtype=torch.long, device=device)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    num_correct, num_correct_norm, num_total = counts.tolist()
    return num_correct, num_correct_norm, num_total


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(description="HellaSwag accuracy of a GPT-2 model (completion style).")
    parser.add_argument("-m", "--model", default="gpt2",
                        help="hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a local Hugging Face GPT-2 "
                             "directory or NanoChat one (--arch modern's export), or a train_gpt2.py checkpoint .pt")
    parser.add_argument("-d", "--device", default=None, help="cuda, cpu or mps (default: the best available)")
    parser.add_argument("--split", default="val", help="val or train (test has no labels)")
    parser.add_argument("--data", default=None, help="a local jsonl in HellaSwag's format (default: download --split)")
    parser.add_argument("--cache_dir", default=None,
                        help="where downloaded splits go (default: $HELLASWAG_CACHE, else ./hellaswag next to "
                             "this file)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="examples per forward pass, 4 rows each (default: 16; 1 on CPU, where one example "
                             "already keeps the cores busy and bigger logits tensors only add memory traffic)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="float32 reproduces the published numbers; bfloat16/float16 autocast is faster on GPU")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch_size must be >= 1")

    try:
        check_split(args.split)
        # the data first: a bad file should fail before a big model loads
        path = Path(args.data) if args.data is not None else download(args.split, args.cache_dir)
        common.gpt2_tokenizer()  # offline without tiktoken's cache: a one-line error (a ValueError)
        n = len(load_examples(data=path, limit=args.limit))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if n == 0:
        raise SystemExit(f"error: {path} has no examples")

    device = common.pick_device(args.device or "auto")
    from train_gpt2 import GPT  # train_gpt2 imports this module: import it only here
    if torch.device(device).type == "cpu":
        common.tune_cpu_allocator()  # reuse the big logits buffers instead of page-faulting them in every forward
    try:
        model = GPT.from_pretrained(args.model)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    model.to(device)
    model.eval()
    batch_size = args.batch_size or (1 if torch.device(device).type == "cpu" else 16)
    autocast_dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    print(f"{args.model}: {n} examples from {path} on {device} ({args.dtype})")
    num_correct, num_correct_norm, num_total = evaluate(
        model, device, data=path, batch_size=batch_size, limit=args.limit,
        autocast_dtype=autocast_dtype, progress=True)
    print(f"acc: {num_correct / num_total:.4f} acc_norm: {num_correct_norm / num_total:.4f} ({num_total} examples)")


if __name__ == "__main__":
    main()
