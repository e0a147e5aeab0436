"""
FineWeb-Edu (or your own text files) -> GPT-2 token shards for train_gpt2.py.

    python fineweb.py                                   # sample-10BT from the hub, ~10B tokens
    python fineweb.py --streaming                       # tokenize while downloading, no 30 GB parquet cache
    python fineweb.py --local_files my/*.jsonl --out_dir my_tokens

Every document becomes [<|endoftext|>] + tiktoken gpt2 encode_ordinary(text). The token stream is cut into
shards of exactly --shard_size tokens (a document may straddle two shards: no token is dropped), saved as
uint16 .npy files out_dir/edufineweb_{val|train}_{index:06d}.npy. Shard 0 is the validation shard and the
last shard holds the remainder. DataLoaderLite in train_gpt2.py memory-maps these files.

Shards are written atomically (temp file, fsync, rename) and out_dir/manifest.json records how many documents
each shard consumed, so an interrupted run, started again with the same command, continues after the last
complete shard and ends with byte-identical shards.
"""
import argparse
import collections
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BATCH_DOCS = 64  # documents per task: enough to hide the cost of a task, few enough to keep all workers busy
MANIFEST = "manifest.json"
SHARD_PREFIX = "edufineweb"
# temp names must not contain "train"/"val" nor end in .npy: loaders pick shards by those
TMP_SHARD = ".shard_{index:06d}.tmp"
TMP_MANIFEST = ".manifest.json.tmp"
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")


class DataError(ValueError):
    """Bad input or a bad out_dir: main() reports it as one line, without a traceback."""


# -----------------------------------------------------------------------------
# tokenization (runs in the worker processes, or in the main process with --num_proc 1)

_enc = None  # the tokenizer, loaded once per process
_docs = None  # a map-style dataset with only the text column: workers read their own slices (see text_tasks)


def init_worker(encoding="gpt2", docs=None):
    import tiktoken
    global _enc, _docs
    _enc, _docs = tiktoken.get_encoding(encoding), docs
    if mp.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's job: no worker tracebacks


def check_tokenizer(encoding):
    """Load the tokenizer here first: tiktoken downloads it once into its cache, which the workers then read. A
    worker whose initializer fails is replaced by another that fails the same way, forever."""
    import tiktoken
    try:
        tiktoken.get_encoding(encoding)
    except OSError as e:  # requests' errors are OSErrors
        raise DataError(f"cannot download the {encoding} tokenizer ({type(e).__name__}); connect to the internet "
                        "once (tiktoken caches it), or set TIKTOKEN_CACHE_DIR to a cache that has it") from None


def to_uint16(ids):
    """Token ids as uint16, refusing (instead of silently wrapping) ids that do not fit."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.max() >= 2**16 or ids.min() < 0):
        raise DataError(f"token id {int(ids.max())} does not fit in uint16 (vocab must be < 65536)")
    return ids.astype(np.uint16)


def tokenize_batch(task):
    """task: a list of texts, or a range of rows of _docs -> (all tokens as uint16, tokens per document incl. EOT)."""
    texts = _docs[task.start:task.stop][_docs.column_names[0]] if isinstance(task, range) else task
    eot = _enc.eot_token
    ids, lens = [], []
    for text in texts:
        if text is None:  # a null row is an empty document
            text = ""
        if not isinstance(text, str):
            raise DataError(f"the text column holds {type(text).__name__} values, not text (see --text_column)")
        doc = _enc.encode_ordinary(text)
        ids.append(eot)
        ids.extend(doc)
        lens.append(len(doc) + 1)
    return to_uint16(ids), np.array(lens, dtype=np.int64)


def tokenized(tasks, num_proc, docs=None, encoding="gpt2"):
    """Yield tokenize_batch(task) for each task, in order, on num_proc processes, with few tasks in flight."""
    if num_proc == 1:
        init_worker(encoding, docs)
        for task in tasks:
            yield tokenize_batch(task)
        return
    # spawn: the same on Linux, macOS and Windows, and safe with the threads datasets/pyarrow/tqdm have started.
    # A memory-mapped dataset pickles as its file paths, so each worker opens it instead of receiving the text.
    with mp.get_context("spawn").Pool(num_proc, initializer=init_worker, initargs=(encoding, docs)) as pool:
        # not pool.imap: it would read the whole dataset ahead into its task queue; submit by hand to bound memory
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(tokenize_batch, (task,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -----------------------------------------------------------------------------
# atomic files and the manifest


def fsync_dir(path):
    if os.name != "nt":  # a directory cannot be opened for fsync on Windows
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, tmp, write):
    """write(f) into tmp, fsync, then rename over path: a reader sees the old file or the whole new one."""
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def shard_name(index):
    return f"{SHARD_PREFIX}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def is_shard_file(name):
    return name.startswith(SHARD_PREFIX) and name.endswith(".npy")


def save_manifest(out_dir, manifest):
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    atomic_write(os.path.join(out_dir, MANIFEST), os.path.join(out_dir, TMP_MANIFEST), lambda f: f.write(data))


class ShardWriter:
    """Cuts the token stream into shards; a background thread saves each shard, then the manifest."""

    def __init__(self, out_dir, manifest, shard_size):
        self.out_dir, self.manifest, self.shard_size = out_dir, manifest, shard_size
        self.buf = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0
        self.index = len(manifest["shards"])  # next shard to write
        self.io = ThreadPoolExecutor(max_workers=1)  # disk writes overlap tokenization
        self.pending = None

    def add(self, tokens, lens, first_doc, first_offset, stop_after=None):
        """Append one batch: tokens of documents first_doc.. (the first one without its first_offset tokens).
        Returns True once stop_after shards exist."""
        pos = 0
        while pos < len(tokens):
            n = min(len(tokens) - pos, self.shard_size - self.fill)
            self.buf[self.fill:self.fill + n] = tokens[pos:pos + n]
            self.fill += n
            pos += n
            if self.fill == self.shard_size:
                # where in the document stream the shard ends: documents fully written, tokens of the next one
                ends = np.cumsum(lens)
                j = int(np.searchsorted(ends, pos, side="right"))
                offset = pos - (int(ends[j - 1]) if j else 0) + (first_offset if j == 0 else 0)
                self.flush(first_doc + j, offset)
                if stop_after is not None and self.index >= stop_after:
                    return True
        return False

    def flush(self, docs_done, doc_offset):
        entry = {"file": shard_name(self.index), "tokens": self.fill, "docs_done": docs_done, "doc_offset": doc_offset}
        self.wait()  # at most one shard being written while the next one fills
        self.pending = self.io.submit(self._save, self.index, self.buf[:self.fill], entry)
        self.index += 1
        self.buf = np.empty(self.shard_size, dtype=np.uint16)
        self.fill = 0

    def _save(self, index, tokens, entry):
        try:
            atomic_write(os.path.join(self.out_dir, entry["file"]),
                         os.path.join(self.out_dir, TMP_SHARD.format(index=index)), lambda f: np.save(f, tokens))
            self.manifest["shards"].append(entry)
            save_manifest(self.out_dir, self.manifest)  # only after the shard is on disk
        except OSError as e:  # disk full, out_dir removed, ...: shards already written stay valid
            raise DataError(f"cannot write {entry['file']} in {self.out_dir}: {e.strerror or e}")

    def wait(self):
        if self.pending is not None:
            self.pending.result()  # re-raises a failed write here
            self.pending = None

    def finish(self, docs_total):
        if self.fill:
            self.flush(docs_total, 0)  # the remainder
        self.wait()
        self.manifest["complete"] = True
        self.manifest["docs_total"] = docs_total
        save_manifest(self.out_dir, self.manifest)

    def close(self):
        self.wait()
        self.io.shutdown()


def open_out_dir(out_dir, settings):
    """Create out_dir or resume in it; returns the manifest (settings, shards written so far)."""
    if os.path.isfile(out_dir):
        raise DataError(f"{out_dir}: --out_dir is a file, not a directory; pick another --out_dir")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create --out_dir ({e.strerror}); pick another --out_dir")
    if not os.access(out_dir, os.W_OK):
        raise DataError(f"--out_dir {out_dir} is not writable; pick another --out_dir")
    for name in os.listdir(out_dir):  # leftovers of a write that was interrupted
        if name.startswith(".shard_") and name.endswith(".tmp") or name == TMP_MANIFEST:
            os.remove(os.path.join(out_dir, name))
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        if any(is_shard_file(n) for n in os.listdir(out_dir)):
            raise DataError(f"{out_dir} holds shards but no {MANIFEST} (not from this script?); "
                            "use a new --out_dir or delete it")
        manifest = {"settings": settings, "shards": [], "complete": False}
        try:
            save_manifest(out_dir, manifest)
        except OSError as e:
            raise DataError(f"cannot write to --out_dir {out_dir}: {e.strerror}; pick another --out_dir")
        return manifest
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); use a new --out_dir or delete it")
    if manifest.get("settings") != settings:
        old = manifest.get("settings") or {}
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in settings if old.get(k) != settings[k])
        raise DataError(f"{out_dir} was made with other settings ({diff}); use a new --out_dir or delete it")
    for entry in manifest["shards"]:
        if not os.path.exists(os.path.join(out_dir, entry["file"])):
            raise DataError(f"{out_dir}/{entry['file']} is missing but listed in {MANIFEST}; "
                            f"delete {out_dir} and rerun")
    return manifest


# -----------------------------------------------------------------------------
# the data source


def builder_for(path):
    name = path.lower()
    for ext in COMPRESSED:  # datasets decompresses these itself
        if name.endswith(ext):
            name = name[: -len(ext)]
    ext = os.path.splitext(name)[1]
    if ext not in BUILDERS:
        raise DataError(f"{path}: unsupported file type {ext or '(none)'}; use .jsonl, .json, .parquet or .txt")
    return BUILDERS[ext]


CHECK_BYTES = 1 << 20  # the head of each text file that is checked before work starts


def check_local_file(path, builder):
    """Refuse a file datasets would choke on (unreadable, empty, not UTF-8, not JSON, not parquet), by name, before
    work starts. Text formats are checked on their first MiB; the rest is read by datasets (see load_source)."""
    fix = {"json": "pass JSON lines, one object per document", "parquet": "pass a parquet file",
           "text": "pass UTF-8 text files"}[builder]
    try:
        with open(path, "rb") as f:
            head = f.read(CHECK_BYTES)
            whole = len(head) < CHECK_BYTES or not f.read(1)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e}); check the path and its permissions")
    if not head.strip():
        raise DataError(f"{path}: the file is empty; {fix}, or leave it out")
    if path.lower().endswith(COMPRESSED):
        return  # datasets decompresses it; its errors are reported in load_source
    if builder == "parquet":
        import pyarrow.parquet as pq
        try:
            pq.ParquetFile(path)  # reads the footer only
        except Exception as e:
            first_line = (str(e).splitlines() or [""])[0]
            raise DataError(f"{path}: not a parquet file ({type(e).__name__}: {first_line}); {fix}")
        return
    import codecs
    try:  # final=False: a multi-byte character cut at the end of the head is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=whole)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{head[e.start]:02x} at offset {e.start}); "
                        "convert it to UTF-8 (e.g. iconv -t utf-8)")
    if builder != "json":
        return
    first = text.lstrip()
    if path.lower().endswith(".json") and first[:1] in ("[", "{"):
        return  # a JSON array or object: datasets reads it whole
    if "\n" in first or whole:  # the first document's line is complete: it must be a JSON object
        lineno = text[:len(text) - len(first)].count("\n") + 1
        try:
            ok = isinstance(json.loads(first.split("\n", 1)[0]), dict)
        except ValueError:
            ok = False
        if not ok:
            raise DataError(f"{path}: line {lineno} is not a JSON object; {fix}")


def local_settings(files):
    """Check the --local_files exist, are readable and share one format; returns (builder, [{path, bytes}])."""
    entries, builders = [], set()
    for path in files:
        if not os.path.exists(path):
            raise DataError(f"local file not found: {path}")
        if os.path.isdir(path):
            raise DataError(f"{path} is a directory; pass its files, e.g. {os.path.join(path, '*.jsonl')}")
        builders.add(builder_for(path))
        check_local_file(path, builder_for(path))
        entries.append({"path": os.path.abspath(path), "bytes": os.path.getsize(path)})
    if len(builders) > 1:
        raise DataError(f"--local_files mixes formats ({', '.join(sorted(builders))}); shard them in separate runs")
    return builders.pop(), entries


def load_source(args, builder):
    """The dataset as a datasets.Dataset (or IterableDataset with --streaming); read only through `datasets`."""
    import datasets
    if args.local_files:
        what, path = ", ".join(args.local_files), builder
        kwargs = {"data_files": list(args.local_files)}
        if builder == "text":
            kwargs["sample_by"] = args.txt_sample_by
        num_proc = min(args.num_proc, len(args.local_files))  # datasets splits the work by file
    else:
        what, path = f"{args.dataset} ({args.remote_name})", args.dataset
        kwargs = {"name": args.remote_name}
        num_proc = args.num_proc
    if not args.streaming and num_proc > 1:
        kwargs["num_proc"] = num_proc  # download and convert to Arrow in parallel too
    try:
        ds = datasets.load_dataset(path, split="train", streaming=args.streaming, **kwargs)
    except Exception as e:  # network, auth, unknown config, unreadable file: all end the same way
        msg = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"could not load {what}: {type(e).__name__}: {msg}")
    columns = ds.column_names
    if columns is not None and args.text_column not in columns:
        raise DataError(f"no column {args.text_column!r} in {what}; columns: {', '.join(columns)} (see --text_column)")
    feature = (ds.features or {}).get(args.text_column)
    if isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string"):
        raise DataError(f"column {args.text_column!r} in {what} holds {feature.dtype}, not text (see --text_column)")
    return ds


def num_docs(ds):
    """Number of documents, when datasets knows it (for the ETA)."""
    try:
        return len(ds)
    except TypeError:  # streaming: maybe the dataset card says
        try:
            return ds.info.splits["train"].num_examples or None
        except Exception:
            return None


def nominal_tokens(remote_name):
    """sample-10BT -> 10e9: a first guess for the bar's ETA until the document count says better."""
    size = remote_name.removeprefix("sample-").removesuffix("BT")
    return int(size) * 10**9 if remote_name.startswith("sample-") and size.isdigit() else None


def streamed_texts(ds, column, start_doc):
    if start_doc:
        ds = ds.skip(start_doc)
    if ds.column_names is not None:
        ds = ds.select_columns([column])  # read only the text
    batches = ds.iter(batch_size=BATCH_DOCS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # a file damaged past the head that check_local_file read
            msg = (str(e).strip().splitlines() or [""])[0]
            raise DataError(f"reading the data failed at document ~{start_doc:,}: {type(e).__name__}: {msg}; "
                            "fix or leave out the file it names")
        if column not in batch:  # streaming without a schema: only the first rows tell
            raise DataError(f"no column {column!r} in the data; columns: {', '.join(batch)} (see --text_column)")
        start_doc += len(batch[column])
        yield batch[column]


def text_tasks(ds, column, start_doc):
    """(tasks, docs): the work from document start_doc on, BATCH_DOCS documents per task. A map-style dataset is
    read by the workers (tasks are row ranges of docs, the text column alone); a streamed one by this process."""
    import datasets
    if isinstance(ds, datasets.Dataset):
        docs = ds.select_columns([column])
        return (range(i, min(i + BATCH_DOCS, len(ds))) for i in range(start_doc, len(ds), BATCH_DOCS)), docs
    return streamed_texts(ds, column, start_doc), None


# -----------------------------------------------------------------------------


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Tokenize FineWeb-Edu (or local text files) into uint16 GPT-2 token "
                                "shards for train_gpt2.py. Rerun the same command to resume an interrupted run.")
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="hub dataset (default: %(default)s)")
    p.add_argument("--remote_name", default="sample-10BT",
                   help="hub config: sample-10BT, sample-100BT, sample-350BT, ...")
    p.add_argument("--local_files", nargs="+", metavar="PATH",
                   help="tokenize these .jsonl/.json/.parquet/.txt files (in this order) instead of the hub dataset")
    p.add_argument("--text_column", default="text", help="column holding the document text (default: %(default)s)")
    p.add_argument("--txt_sample_by", default="document", choices=["document", "paragraph", "line"],
                   help="what one document is in .txt files (default: the whole file)")
    p.add_argument("--out_dir", default=None,
                   help="where shards go (default: edu_fineweb10B, edu_fineweb100B for sample-100BT, ...)")
    p.add_argument("--shard_size", type=int, default=10**8, help="tokens per shard (default: 100M)")
    p.add_argument("--num_proc", type=int, default=cpu_count(), help="tokenizer processes (default: all cores)")
    p.add_argument("--streaming", action="store_true",
                   help="tokenize while downloading, instead of first caching the whole dataset "
                   "(~30 GB for sample-10BT)")
    p.add_argument("--stop_after_shards", type=int, default=None, metavar="N",
                   help="stop once N shards exist (for tests and partial runs); rerun without it to continue")
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error("--shard_size must be >= 1")
    if args.num_proc < 1:
        p.error("--num_proc must be >= 1")
    if args.out_dir is None:  # train_gpt2.py reads edu_fineweb10B by default
        size = nominal_tokens(args.remote_name)
        args.out_dir = ("edu_fineweb10B" if args.local_files else
                        f"edu_fineweb{size // 10**9}B" if size else f"edu_fineweb_{args.remote_name}")
    return args


def main(argv=None):
    """Run the whole job; returns {"tokens", "shards", "seconds", "complete"} (tokens/seconds of this run)."""
    args = get_args(argv)
    if args.local_files:
        builder, files = local_settings(args.local_files)
        settings = {"dataset": None, "remote_name": None, "local_files": files,
                    "txt_sample_by": args.txt_sample_by if builder == "text" else None}
    else:
        builder = None
        settings = {"dataset": args.dataset, "remote_name": args.remote_name, "local_files": None,
                    "txt_sample_by": None}
    settings.update(text_column=args.text_column, shard_size=args.shard_size, encoding="gpt2")
    manifest = open_out_dir(args.out_dir, settings)
    shards = manifest["shards"]
    done_tokens = sum(s["tokens"] for s in shards)
    if manifest.get("complete"):
        print(f"{args.out_dir} is complete: {len(shards)} shards, {done_tokens:,} tokens; nothing to do")
        return {"tokens": 0, "shards": len(shards), "seconds": 0.0, "complete": True}
    if args.stop_after_shards is not None and len(shards) >= args.stop_after_shards:
        print(f"{args.out_dir} already has {len(shards)} shards (--stop_after_shards {args.stop_after_shards})")
        return {"tokens": 0, "shards": len(shards), "seconds": 0.0, "complete": False}
    start_doc, start_offset = (shards[-1]["docs_done"], shards[-1]["doc_offset"]) if shards else (0, 0)
    if shards:
        print(f"resuming after shard {len(shards) - 1}: document {start_doc:,} (token {start_offset:,} of it)")

    check_tokenizer(settings["encoding"])
    ds = load_source(args, builder)
    total_docs = num_docs(ds)
    print(f"tokenizing into {args.out_dir}/ with {args.num_proc} process{'es' * (args.num_proc > 1)}, "
          f"shards of {args.shard_size:,} tokens")

    from tqdm import tqdm
    bar = tqdm(unit="tok", unit_scale=True, initial=done_tokens, smoothing=0.05, dynamic_ncols=True,
               total=None if args.local_files else nominal_tokens(args.remote_name))
    writer = ShardWriter(args.out_dir, manifest, args.shard_size)
    doc, skip, tokens_run, stopped = start_doc, start_offset, 0, False
    t0 = time.time()
    tasks, docs = text_tasks(ds, args.text_column, start_doc)
    batches = tokenized(tasks, args.num_proc, docs)
    try:
        for tokens, lens in batches:
            if skip:  # the straddling document's head is already in the last shard
                tokens, lens = tokens[skip:], lens.copy()
                lens[0] -= skip
            stopped = writer.add(tokens, lens, doc, skip, args.stop_after_shards)
            doc += len(lens)
            skip = 0
            tokens_run += len(tokens)
            bar.update(len(tokens))
            if total_docs and doc > start_doc:  # ETA: extrapolate tokens per document seen so far
                bar.total = int(done_tokens + tokens_run * (total_docs - start_doc) / (doc - start_doc))
            if stopped:
                break
        if not stopped:
            if doc == 0:
                raise DataError("the dataset has no documents")
            writer.finish(doc)
    finally:  # also on Ctrl-C: stop the workers, but let the shard being saved reach the disk
        batches.close()
        writer.close()
        bar.close()
    seconds = time.time() - t0
    n = len(manifest["shards"])
    tokens_run = sum(s["tokens"] for s in manifest["shards"]) - done_tokens  # written by this run
    if stopped:
        print(f"stopped after {n} shards (--stop_after_shards); rerun without it to continue")
    else:
        print(f"done: {n} shards, {done_tokens + tokens_run:,} tokens from {doc:,} documents in {args.out_dir}/")
    print(f"{tokens_run:,} tokens in {seconds:.1f} s ({tokens_run / max(seconds, 1e-9):,.0f} tokens/s)")
    return {"tokens": tokens_run, "shards": n, "seconds": seconds, "complete": not stopped}


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted: complete shards are kept; run the same command again to resume")
