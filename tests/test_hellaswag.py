"""hellaswag.py: rendering, batched scoring, the CLI against transformers, bad input. (The in-loop eval under
train_gpt2.py, one process, DDP and FSDP, is tested in test_train_gpt2.py.)"""

import json
import re
import subprocess
import sys

import pytest
import tiktoken
import torch
import torch.nn.functional as F

import hellaswag
from conftest import ROOT, run_env
from train_gpt2 import GPT, GPTConfig

FINAL_LINE = re.compile(r"^acc: (\d\.\d{4}) acc_norm: (\d\.\d{4}) \((\d+) examples\)$")


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def reference_predictions(forward, rows, vocab=50257, block_size=None):
    """One ending at a time, no padding, tokenized here with plain tiktoken: (pred, pred_norm, labels, margins).
    forward(idx (1, T)) -> logits (1, T, V). Rows longer than block_size keep their last block_size tokens."""
    enc = tiktoken.get_encoding("gpt2")
    preds, preds_norm, labels, margins = [], [], [], []
    with torch.no_grad():
        for row in rows:
            ctx = enc.encode(row["ctx"])
            sums, means = [], []
            for ending in row["endings"]:
                end = enc.encode(" " + ending)
                row_tokens = (ctx + end)[-block_size:] if block_size else ctx + end
                n = min(len(end), len(row_tokens) - 1)  # scored: ending tokens with a token before them
                logits = forward(torch.tensor([row_tokens]))[0, :, :vocab].float()
                # the logits at position p predict token p + 1
                losses = F.cross_entropy(logits[-n - 1 : -1], torch.tensor(row_tokens[-n:]), reduction="none")
                sums.append(losses.sum().item())
                means.append(losses.mean().item())
            preds.append(min(range(4), key=lambda i: sums[i]))
            preds_norm.append(min(range(4), key=lambda i: means[i]))
            labels.append(row["label"])
            for scores in (sums, means):
                best, second = sorted(scores)[:2]
                margins.append(second - best)
    return preds, preds_norm, labels, margins


def tiny_gpt(seed=0):
    """A random 2-layer GPT with the trainer's padded vocab; weights scaled up so endings score apart."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=256, vocab_size=50304, n_layer=2, n_head=2, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
        # padded vocab rows (never real tokens) with big logits: scoring over them would change every loss
        model.lm_head.weight[50257:] *= 50
    return model.eval()


# -----------------------------------------------------------------------------


def test_render_example_layout(hellaswag_sample):
    row = read_rows(hellaswag_sample)[0]
    data, tokens, mask, label = hellaswag.render_example(row)
    # "A man is sitting on a roof. he", checked by hand against tiktoken's gpt2 encoding
    ctx = [32, 582, 318, 5586, 319, 257, 9753, 13, 339]
    enc = tiktoken.get_encoding("gpt2")
    endings = [enc.encode(" " + e) for e in row["endings"]]
    assert [len(e) for e in endings] == [11, 6, 8, 9]
    assert enc.decode(endings[3]) == " starts pulling up roofing on a roof."
    assert label == 3 and data["label"] == 3
    assert data["ctx_tokens"] == ctx and data["ending_tokens"] == endings
    assert tokens.shape == mask.shape == (4, 9 + 11)
    assert tokens.dtype == mask.dtype == torch.long
    for i, end in enumerate(endings):
        n = 9 + len(end)
        assert tokens[i, :9].tolist() == ctx
        assert tokens[i, 9:n].tolist() == end
        assert tokens[i, n:].tolist() == [0] * (20 - n)
        assert mask[i].tolist() == [0] * 9 + [1] * len(end) + [0] * (20 - n)


def test_iterate_examples_and_cache_dir(hellaswag_sample, tmp_path, monkeypatch):
    rows = list(hellaswag.iterate_examples(data=hellaswag_sample))
    assert len(rows) == 50 and rows[0]["ind"] == 24 and rows[-1] == read_rows(hellaswag_sample)[-1]
    # a split already in the cache dir is used as is (no download)
    (tmp_path / "hellaswag_val.jsonl").write_bytes(hellaswag_sample.read_bytes())
    monkeypatch.setenv("HELLASWAG_CACHE", str(tmp_path))
    assert hellaswag.download("val") == tmp_path / "hellaswag_val.jsonl"
    examples = hellaswag.load_examples("val", limit=7)
    assert len(examples) == 7 and [e[2] for e in examples] == [r["label"] for r in rows[:7]]


def test_scores_match_reference_and_batched_equals_one_at_a_time(hellaswag_sample):
    model = tiny_gpt()
    rows = read_rows(hellaswag_sample)
    ref, ref_norm, labels, margins = reference_predictions(lambda idx: model(idx)[0], rows)
    assert min(margins) > 1e-3, "near ties: the comparison below would be decided by float noise"
    examples = hellaswag.load_examples(data=hellaswag_sample)

    # the losses themselves, for the first example (padded vocab excluded)
    tokens, mask, _ = examples[0]
    sum_loss, mean_loss = hellaswag.score_rows(model, tokens, mask)
    logprobs = F.log_softmax(model(tokens)[0][:, :-1, :50257].float(), dim=-1)
    token_losses = -logprobs.gather(-1, tokens[:, 1:, None])[..., 0] * mask[:, 1:]
    torch.testing.assert_close(sum_loss, token_losses.sum(1))
    torch.testing.assert_close(mean_loss, token_losses.sum(1) / mask[:, 1:].sum(1))

    for batch_size in (1, 16):  # 16: rows of different lengths padded into one forward
        pred, pred_norm, got_labels = hellaswag.predict(model, "cpu", examples, batch_size=batch_size)
        assert pred.tolist() == ref, batch_size
        assert pred_norm.tolist() == ref_norm, batch_size
        assert got_labels.tolist() == labels

    # evaluate: examples i % world_size == rank are this rank's
    correct = [p == y for p, y in zip(ref, labels)]
    correct_norm = [p == y for p, y in zip(ref_norm, labels)]
    for rank in range(3):
        expected = (sum(correct[rank::3]), sum(correct_norm[rank::3]), len(correct[rank::3]))
        assert hellaswag.evaluate(model, "cpu", data=hellaswag_sample, rank=rank, world_size=3) == expected


def test_rows_longer_than_block_size_keep_their_end(hellaswag_sample):
    model = tiny_gpt()
    model.config.block_size = 24  # shorter than most rows: their context is cut on the left
    rows = read_rows(hellaswag_sample)[:10]
    ref, ref_norm, _, _ = reference_predictions(lambda idx: model(idx)[0], rows, block_size=24)
    examples = hellaswag.load_examples(data=hellaswag_sample, limit=10)
    pred, pred_norm, _ = hellaswag.predict(model, "cpu", examples, batch_size=4)
    assert pred.tolist() == ref and pred_norm.tolist() == ref_norm


def main_error(argv):
    """hellaswag.main(argv) in this process: it exits with its one-line message, SystemExit("error: ...")."""
    with pytest.raises(SystemExit) as e:
        hellaswag.main(argv)
    err = str(e.value.code)
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_matches_transformers(hellaswag_sample, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=256, initializer_range=0.2)
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    hellaswag.main(["-m", str(tmp_path / "hf"), "--data", str(hellaswag_sample), "-d", "cpu", "--batch_size", "7"])
    out = capsys.readouterr().out
    match = FINAL_LINE.match(out.strip().splitlines()[-1])
    assert match, out

    rows = read_rows(hellaswag_sample)
    ref, ref_norm, labels, margins = reference_predictions(lambda idx: hf(idx).logits, rows)
    assert min(margins) > 1e-3
    acc = sum(p == y for p, y in zip(ref, labels)) / len(rows)
    acc_norm = sum(p == y for p, y in zip(ref_norm, labels)) / len(rows)
    assert match.groups() == (f"{acc:.4f}", f"{acc_norm:.4f}", "50")


def test_bad_rows_name_file_and_line(hellaswag_sample, tmp_path):
    good = hellaswag_sample.read_text(encoding="utf-8").splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(good[:2] + [good[2][:-5]] + good[3:]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: malformed JSON"):
        hellaswag.load_examples(data=broken)

    row = json.loads(good[1])
    del row["endings"]
    missing = tmp_path / "missing.jsonl"
    missing.write_text("\n".join([good[0], json.dumps(row)]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing\.jsonl:2: missing key 'endings'"):
        list(hellaswag.iterate_examples(data=missing))

    row = json.loads(good[0])
    row["label"] = 4
    bad_label = tmp_path / "label.jsonl"
    bad_label.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"label\.jsonl:1: 'label' must be 0, 1, 2 or 3"):
        hellaswag.load_examples(data=bad_label)

    with pytest.raises(ValueError, match="no labels"):
        hellaswag.evaluate(tiny_gpt(), "cpu", split="test")

    # the CLI: one line (the data is checked before any model loads)
    for extra, message in [
        (["--data", str(broken)], "broken.jsonl:3: malformed JSON"),
        (["--split", "test"], "test split has no labels"),
    ]:
        assert message in main_error(["-m", "gpt2", *extra])


def test_cli_bad_files_and_cache_dir_are_one_line(hellaswag_sample, tmp_path):
    """Unreadable data, a data folder, a cache dir that is a file, a checkpoint that does not fit its config."""
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(
        hellaswag_sample.read_bytes().splitlines(keepends=True)[0] + '{"ctx": "caf\u00e9"}\n'.encode("latin-1")
    )
    a_file = tmp_path / "cache"
    a_file.write_text("mine")
    cases = [
        (["--data", str(latin)], "latin.jsonl: not UTF-8 text"),
        (["--data", str(tmp_path)], "a directory, not a HellaSwag jsonl file"),
        (["--cache_dir", str(a_file)], "cache: cannot use it as the HellaSwag cache directory"),
    ]
    for extra, message in cases:
        assert message in main_error(["-m", "gpt2", *extra])
    assert a_file.read_text() == "mine"
    # and once through a real process (the one for hellaswag.py's errors): one line on stderr, no traceback
    out = subprocess.run(
        [sys.executable, "hellaswag.py", "-m", "gpt2", *cases[0][0]],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = out.stderr.strip()
    assert out.returncode == 1 and "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("error: ") and cases[0][1] in err, err


def test_modern_arch_scores_match_reference(hellaswag_sample):
    """--arch modern: rotary positions (padding on the right must not move them) and soft-capped logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=50304, n_layer=2, n_head=2, n_embd=64, arch="modern"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        model.lm_head.weight *= 4  # logits far beyond the cap of 15, which the reference sees capped too
    model.eval()
    examples = hellaswag.load_examples(data=hellaswag_sample, limit=20)
    tokens, mask, _ = examples[0]
    logprobs = F.log_softmax(model(tokens)[0][:, :-1, :50257].float(), dim=-1)
    token_losses = -logprobs.gather(-1, tokens[:, 1:, None])[..., 0] * mask[:, 1:]
    torch.testing.assert_close(hellaswag.score_rows(model, tokens, mask)[0], token_losses.sum(1))
    rows = read_rows(hellaswag_sample)[:20]
    ref, ref_norm, labels, margins = reference_predictions(lambda idx: model(idx)[0], rows)
    assert min(margins) > 1e-3
    pred, pred_norm, _ = hellaswag.predict(model, "cpu", examples, batch_size=8)
    assert pred.tolist() == ref and pred_norm.tolist() == ref_norm
    expected = (sum(p == y for p, y in zip(ref, labels)), sum(p == y for p, y in zip(ref_norm, labels)), 20)
    assert hellaswag.evaluate(model, "cpu", data=hellaswag_sample, limit=20) == expected


# -----------------------------------------------------------------------------
# GPU review (issue 20): concurrent downloads into a shared cache


def test_two_downloads_with_the_same_pid_into_one_cache_both_succeed(hellaswag_sample, tmp_path, monkeypatch):
    """Ranks of two nodes can share a pid and a cache directory: two threads of one process are such a pair. The
    server sends half of the file to both before finishing either, so the two downloads overlap."""
    import http.server
    import threading

    body = hellaswag_sample.read_bytes()
    both_started = threading.Barrier(2, timeout=10)

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            both_started.wait()
            threading.Event().wait(0.2)  # both clients have opened their temp file by now
            self.wfile.write(body[len(body) // 2 :])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(hellaswag, "DATA_URL", f"http://127.0.0.1:{server.server_port}/hellaswag_{{split}}.jsonl")
    errors = []

    def download():
        try:
            hellaswag.download("val", cache_dir=tmp_path)
        except BaseException as e:  # any error, not only the one a lost race used to raise
            errors.append(e)

    threads = [threading.Thread(target=download) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert not [t for t in threads if t.is_alive()], "a download still runs after 30 s"
    assert not errors, errors
    assert (tmp_path / "hellaswag_val.jsonl").read_bytes() == body
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hellaswag_val.jsonl"]  # no temp file left behind


def test_offline_without_the_tokenizer_cache_is_one_line(hellaswag_sample, offline_no_tokenizer):
    err = main_error(["-m", "gpt2", "--data", str(hellaswag_sample)])
    assert "cannot download the GPT-2 tokenizer" in err and "TIKTOKEN_CACHE_DIR" in err
