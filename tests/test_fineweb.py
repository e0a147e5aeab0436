"""fineweb.py on the committed FineWeb sample (100 real documents): exact tokens, shard layout, resume, errors."""

import contextlib
import io
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken

import fineweb
from conftest import ROOT, run_env

SCRIPT = str(ROOT / "fineweb.py")
SHARD = 12_000  # the sample's 56739 tokens -> 4 full shards + a remainder
EOT = 50256


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = run_env()
    e["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets_cache"))  # keep ~/.cache out of it
    return e


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """In-process runs keep ~/.cache out of it too."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache_here")))
        yield


def run(env, *args, check=True, timeout=180):
    """python fineweb.py args, a real process (the killed run and the error path need one)."""
    proc = subprocess.run(
        [sys.executable, SCRIPT, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def run_here(*args):
    """fineweb.main(args) in this process (no interpreter start-up; --num_proc > 1 still spawns its workers): stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fineweb.main([str(a) for a in args])
    return out.getvalue()


def read_texts(path):
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def docs(fineweb_jsonl):
    return read_texts(fineweb_jsonl)


@pytest.fixture(scope="module")
def expected(docs):
    """[EOT] + encode_ordinary(doc) for every document, concatenated, and each document's length."""
    enc = tiktoken.get_encoding("gpt2")
    per_doc = [[EOT] + enc.encode_ordinary(d) for d in docs]
    return np.concatenate([np.array(t, dtype=np.uint16) for t in per_doc]), np.array([len(t) for t in per_doc])


def shard_files(out_dir):
    return sorted(n for n in os.listdir(out_dir) if n.endswith(".npy"))


def read_shards(out_dir):
    return [np.load(os.path.join(out_dir, n)) for n in shard_files(out_dir)]


def file_bytes(out_dir):
    return {n: Path(out_dir, n).read_bytes() for n in shard_files(out_dir)}


def manifest(out_dir):
    with open(os.path.join(out_dir, "manifest.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def made(fineweb_jsonl, fineweb_parquet, tmp_path_factory):
    """made(fmt, num_proc, *extra) -> out_dir with the sample's shards; each variant is built once per module."""
    _made = {}

    def make(fmt, num_proc, *extra):
        key = (fmt, num_proc, *extra)
        if key not in _made:
            out = tmp_path_factory.mktemp(f"shards_{fmt}_{num_proc}")
            run_here(
                "--local_files",
                {"jsonl": fineweb_jsonl, "parquet": fineweb_parquet}[fmt],
                "--out_dir",
                out,
                "--shard_size",
                SHARD,
                "--num_proc",
                num_proc,
                *extra,
            )
            _made[key] = str(out)
        return _made[key]

    return make


def test_sample_token_counts(docs, fineweb_jsonl, fineweb_parquet, expected):
    tokens, lens = expected
    assert len(docs) == 100 and len(tokens) == int(lens.sum()) and 4 * SHARD < len(tokens) < 5 * SHARD
    # FineWeb's own GPT-2 token_count agrees with tiktoken, except where its PII step replaced an email address
    # after counting (documents 41, 54 and 70 of the stream)
    enc = tiktoken.get_encoding("gpt2")
    with open(fineweb_jsonl) as f:
        rows = [json.loads(line) for line in f]
    differ = [r["id"] for r in rows if len(enc.encode_ordinary(r["text"])) != r["token_count"]]
    assert differ == [41, 54, 70] and all("@example." in rows[i]["text"] for i in differ)
    import pyarrow.parquet as pq

    assert pq.read_table(fineweb_parquet)["text"].to_pylist() == docs


@pytest.mark.parametrize("fmt,num_proc", [("jsonl", 1), ("parquet", 2)])
def test_shards_are_the_documents_in_order(made, expected, fmt, num_proc):
    out = made(fmt, num_proc)
    tokens, lens = expected
    assert shard_files(out) == [
        "edufineweb_train_000001.npy",
        "edufineweb_train_000002.npy",
        "edufineweb_train_000003.npy",
        "edufineweb_train_000004.npy",
        "edufineweb_val_000000.npy",
    ]
    shards = [np.load(os.path.join(out, e["file"])) for e in manifest(out)["shards"]]  # in index order
    assert all(s.dtype == np.uint16 for s in shards)
    assert [len(s) for s in shards] == [SHARD] * 4 + [len(tokens) - 4 * SHARD]
    np.testing.assert_array_equal(np.concatenate(shards), tokens)
    # the manifest says where each shard ends in the document stream
    m = manifest(out)
    assert m["complete"] and m["docs_total"] == 100
    ends = np.cumsum(lens)
    for i, e in enumerate(m["shards"]):
        before = int(ends[e["docs_done"] - 1]) if e["docs_done"] else 0
        assert before + e["doc_offset"] == min((i + 1) * SHARD, len(tokens))
        assert 0 <= e["doc_offset"] < (lens[e["docs_done"]] if e["docs_done"] < 100 else 1)


def test_num_proc_1_and_2_give_identical_shards(made):
    one, two = file_bytes(made("jsonl", 1)), file_bytes(made("jsonl", 2))
    assert len(one) == 5 and one == two


def test_streaming_gives_identical_shards(made):
    assert file_bytes(made("jsonl", 2, "--streaming")) == file_bytes(made("jsonl", 1))


def test_stop_and_resume_is_byte_identical(made, fineweb_jsonl, expected, tmp_path):
    ref = file_bytes(made("jsonl", 1))
    args = ["--local_files", fineweb_jsonl, "--out_dir", tmp_path, "--shard_size", SHARD]
    # where shard 1 ends in the document stream: inside a document, so the resumed run must start mid-document
    ends = np.cumsum(expected[1])
    doc = int(np.searchsorted(ends, 2 * SHARD, side="right"))
    offset = 2 * SHARD - int(ends[doc - 1])
    assert 0 < offset < expected[1][doc]
    assert "stopped after 2 shards" in run_here(*args, "--num_proc", 2, "--stop_after_shards", 2)
    assert shard_files(tmp_path) == ["edufineweb_train_000001.npy", "edufineweb_val_000000.npy"]
    m = manifest(tmp_path)
    assert not m["complete"] and (m["shards"][-1]["docs_done"], m["shards"][-1]["doc_offset"]) == (doc, offset)
    assert "resuming after shard 1" in run_here(*args, "--num_proc", 1)
    assert file_bytes(tmp_path) == ref and manifest(tmp_path)["complete"]
    # a finished out_dir is left alone
    assert "nothing to do" in run_here(*args) and file_bytes(tmp_path) == ref
    # and cannot be continued with other settings
    with pytest.raises(fineweb.DataError, match=r"made with other settings \(.*shard_size.*\); use a new --out_dir"):
        run_here(*args[:-1], 1000)


def test_resume_at_every_shard_inside_a_long_document(docs, expected, tmp_path):
    # the sample's longest document (5602 tokens) spans eight 700-token shards, so most runs below start and
    # end inside it. Each run writes one shard and stops; together they must equal one uninterrupted run.
    longest = int(np.argmax(expected[1]))
    assert expected[1][longest] > 8 * 700
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:5] + [docs[longest]] + docs[5:10]))
    args = ["--local_files", str(corpus), "--shard_size", "700", "--num_proc", "1"]
    fineweb.main(args + ["--out_dir", str(tmp_path / "ref")])
    n = len(shard_files(tmp_path / "ref"))
    assert n > 12
    for k in range(1, n + 1):
        fineweb.main(args + ["--out_dir", str(tmp_path / "out"), "--stop_after_shards", str(k)])
        assert len(shard_files(tmp_path / "out")) == k and manifest(tmp_path / "out")["complete"] == (k == n)
    fineweb.main(args + ["--out_dir", str(tmp_path / "out")])  # nothing left to do
    assert manifest(tmp_path / "out")["complete"] and file_bytes(tmp_path / "out") == file_bytes(tmp_path / "ref")


def test_streaming_resume(made, fineweb_jsonl, tmp_path):
    args = [
        "--local_files",
        fineweb_jsonl,
        "--out_dir",
        tmp_path,
        "--shard_size",
        SHARD,
        "--streaming",
        "--num_proc",
        1,
    ]
    run_here(*args, "--stop_after_shards", 3)
    assert len(shard_files(tmp_path)) == 3
    run_here(*args)
    assert file_bytes(tmp_path) == file_bytes(made("jsonl", 1))


def npy_bytes(tokens):
    buf = io.BytesIO()
    np.save(buf, tokens)
    return buf.getvalue()


def test_killed_run_resumes_byte_identical(env, docs, expected, tmp_path):
    # a corpus long enough that SIGKILL lands mid-run: the sample 30 times, 1.7M tokens, 142 shards
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs * 30))
    stream = np.tile(expected[0], 30)
    n = -(-len(stream) // SHARD)
    # what an uninterrupted run writes (test_shards_are_the_documents_in_order checks that one on the sample)
    want = {fineweb.shard_name(i): npy_bytes(stream[i * SHARD : (i + 1) * SHARD]) for i in range(n)}
    out = tmp_path / "out"
    args = [
        sys.executable,
        SCRIPT,
        "--local_files",
        str(corpus),
        "--shard_size",
        str(SHARD),
        "--num_proc",
        "2",
        "--out_dir",
        str(out),
    ]
    # kill the whole process group (main process and tokenizer workers) once the first shard is recorded
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if manifest(out)["shards"]:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    m = manifest(out)
    assert not m["complete"] and 1 <= len(m["shards"]) < n
    for name in shard_files(out):  # a shard file on disk is always complete
        assert len(np.load(out / name)) == SHARD
    assert "resuming after shard" in run_here(*args[2:])  # the same command again
    assert file_bytes(out) == want
    assert sorted(os.listdir(out)) == sorted(want) + ["manifest.json"]  # no temp files left behind


def test_txt_files_are_one_document_each(tmp_path, docs):
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for p, d in zip(paths, docs[:2]):
        p.write_text(d)
    run_here("--local_files", *paths, "--out_dir", tmp_path / "out", "--num_proc", 1)
    enc = tiktoken.get_encoding("gpt2")
    want = [EOT] + enc.encode_ordinary(docs[0]) + [EOT] + enc.encode_ordinary(docs[1])
    assert [s.tolist() for s in read_shards(tmp_path / "out")] == [want]


def test_dataloaderlite_reads_the_shards(made, expected):
    from train_gpt2 import DataLoaderLite

    out, (tokens, _) = made("jsonl", 1), expected
    B, T = 4, 64
    val = DataLoaderLite(B, T, split="val", data_root=out)
    x, y = val.next_batch()
    assert x.shape == y.shape == (B, T)
    assert x.flatten().tolist() == tokens[: B * T].tolist() and y.flatten().tolist() == tokens[1 : B * T + 1].tolist()
    train = DataLoaderLite(B, T, split="train", data_root=out)
    x, _ = train.next_batch()
    assert x.flatten().tolist() == tokens[SHARD : SHARD + B * T].tolist()  # shard 1 is the first train shard
    for _ in range(SHARD // (B * T)):  # on into shard 2
        x, _ = train.next_batch()
    assert x.flatten().tolist() == tokens[2 * SHARD : 2 * SHARD + B * T].tolist()


def test_cli_errors_are_one_line(fineweb_jsonl, tmp_path):
    sample = fineweb_jsonl
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    cases = [
        (["--local_files", tmp_path / "missing.jsonl"], "local file not found"),
        (["--local_files", sample, "--text_column", "body"], "columns: id, text, language"),
        (["--local_files", sample, "--text_column", "id"], "not text"),
        (["--local_files", sample, "--out_dir", not_a_dir / "sub"], "cannot create --out_dir"),
        ([], "could not load HuggingFaceFW/fineweb-edu (sample-10BT)"),  # the hub path, offline here
    ]
    for args, message in cases:
        if "--out_dir" not in args:
            args = args + ["--out_dir", tmp_path / f"out{len(message)}"]
        with pytest.raises(fineweb.DataError, match=re.escape(message)) as e:
            run_here(*args)
        assert "\n" not in str(e.value)


def test_input_checks(tmp_path, fineweb_jsonl, fineweb_parquet):
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(fineweb.DataError, match="unsupported file type .csv"):
        fineweb.main(["--local_files", str(csv), "--out_dir", str(tmp_path / "o1")])
    with pytest.raises(fineweb.DataError, match="mixes formats"):
        fineweb.main(["--local_files", str(fineweb_jsonl), str(fineweb_parquet), "--out_dir", str(tmp_path / "o2")])
    (tmp_path / "o3").mkdir()
    np.save(tmp_path / "o3" / "edufineweb_train_000001.npy", np.zeros(3, np.uint16))
    with pytest.raises(fineweb.DataError, match="no manifest.json"):
        fineweb.main(["--local_files", str(fineweb_jsonl), "--out_dir", str(tmp_path / "o3")])


def test_token_ids_must_fit_uint16():
    assert fineweb.to_uint16([0, 50256, 65535]).dtype == np.uint16
    with pytest.raises(fineweb.DataError, match="65536 does not fit in uint16"):
        fineweb.to_uint16([1, 65536])


def test_defaults_are_the_real_job():
    args = fineweb.get_args([])
    assert (args.dataset, args.remote_name, args.local_files, args.text_column) == (
        "HuggingFaceFW/fineweb-edu",
        "sample-10BT",
        None,
        "text",
    )
    assert (args.out_dir, args.shard_size, args.streaming) == ("edu_fineweb10B", 10**8, False)
    assert args.num_proc == fineweb.cpu_count() >= 1
    assert fineweb.get_args(["--remote_name", "sample-100BT"]).out_dir == "edu_fineweb100B"


def test_bad_local_files_and_out_dir_are_one_line(env, fineweb_jsonl, tmp_path):
    """Each bad input by name, before any work: nothing is written to --out_dir."""

    def write(name, data):
        path = tmp_path / name
        path.write_bytes(data)
        return path

    latin = write("latin.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    latin_txt = write("latin.txt", "caf\u00e9\n".encode("latin-1"))
    empty = write("empty.jsonl", b"")
    not_json = write("docs.jsonl", b"text,id\nhello,1\n")
    not_parquet = write("docs.parquet", fineweb_jsonl.read_bytes()[:2000])
    a_file = write("out_file", b"mine")
    cases = [
        ([latin], "latin.jsonl: not UTF-8 text (byte 0xe9 at offset 13)"),
        ([latin_txt], "latin.txt: not UTF-8 text"),
        ([empty], "empty.jsonl: the file is empty"),
        ([not_json], "docs.jsonl: line 1 is not a JSON object"),
        ([not_parquet], "docs.parquet: not a parquet file"),
        ([fineweb_jsonl, "--out_dir", a_file], "out_file: --out_dir is a file, not a directory"),
    ]
    for i, (args, message) in enumerate(cases):
        out = args if "--out_dir" in args else args + ["--out_dir", tmp_path / f"out{i}"]
        with pytest.raises(fineweb.DataError, match=re.escape(message)):
            fineweb.main(["--local_files", *map(str, out)])
        assert not (tmp_path / f"out{i}").exists()
    assert a_file.read_bytes() == b"mine"
    proc = run(env, "--local_files", latin, "--out_dir", tmp_path / "cli", check=False)  # and through the script
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("error: ") and "latin.jsonl: not UTF-8 text" in err


def test_offline_without_the_tokenizer_cache_is_one_line(fineweb_jsonl, tmp_path, offline_no_tokenizer):
    """Checked before the workers start: a worker whose initializer fails is respawned forever (a hang)."""
    with pytest.raises(fineweb.DataError, match="cannot download the gpt2 tokenizer .*TIKTOKEN_CACHE_DIR"):
        run_here("--local_files", fineweb_jsonl, "--out_dir", tmp_path / "out", "--num_proc", 2)
