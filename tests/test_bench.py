"""bench.py runs its modes end to end on tiny settings and prints lines that parse. No timing is checked."""
import re
import subprocess
import sys

from conftest import ROOT, run_env

NUM = r"([0-9]+(?:\.[0-9]+)?)"


def bench(*args, timeout=120):
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_train_compare_hf_prints_every_variant_and_the_ratio_line_last():
    out = bench("--model", "d2", "--batch_size", "2", "--seq_len", "32", "--steps", "2", "--compile", "0", "--compare", "hf")
    lines = out.strip().splitlines()
    assert re.fullmatch(rf"ratio vs hf fp32: {NUM}  vs hf same settings: {NUM}", lines[-1]), lines[-1]
    rows = re.findall(rf"^\s+{NUM} tok/s \| {NUM} ms/step \(forward {NUM}, backward {NUM}, clip\+optimizer {NUM}\) \| "
                      rf"{NUM} GFLOP/s \| MFU {NUM}% \(forward\+backward alone {NUM}%\) of measured (bf16|fp32) matmul peak", out, re.M)
    assert len(rows) == 3, out
    assert [r[-1] for r in rows][1] == "fp32"  # the Hugging Face baseline runs in fp32
    for tok_s, step_ms, fwd, bwd, opt, *_ in rows:
        # the split adds up to the step (medians of each part, so only roughly)
        assert float(tok_s) > 0 and float(step_ms) > 0
        assert 0.5 < (float(fwd) + float(bwd) + float(opt)) / float(step_ms) < 1.5
    assert "GPT2LMHeadModel" in out and "peak RSS" in out
    # ours and theirs start from different random weights but train on the same tokens: both near ln(50257) ~ 10.8
    losses = [float(m) for m in re.findall(rf"loss {NUM}$", out, re.M)]
    assert len(losses) == 3 and all(5 < l < 12 for l in losses), losses


def test_memory_mode_reports_the_same_loss_for_full_logits_and_chunked_loss():
    out = bench("--mode", "memory", "--model", "d2", "--batch_size", "2", "--seq_len", "32", "--dtype", "float32", "--repeats", "1")
    rows = re.findall(rf"^(full logits|chunked loss) .*? fp32: peak RSS {NUM} GiB .*?losses ([0-9., ]+), step times", out, re.M)
    assert [r[0] for r in rows] == ["full logits", "chunked loss"] and all(float(r[1]) > 0 for r in rows), out
    full, chunked = ([float(x) for x in r[2].split(", ")] for r in rows)
    assert len(full) == len(chunked) == 2
    assert all(abs(a - b) < 1e-4 for a, b in zip(full, chunked)), (full, chunked)
    assert re.search(rf"peak memory with the chunked loss: [+-]{NUM}%", out), out


def test_sample_mode_decodes_the_same_tokens_with_and_without_the_cache():
    out = bench("--mode", "sample", "--model", "d1", "--max_new_tokens", "12", "--repeats", "1")
    assert "identical tokens: True" in out, out
    assert re.search(rf"^sampling speed-up with the KV cache: {NUM}x$", out, re.M), out


def test_hellaswag_mode_predicts_the_same_batched_and_one_at_a_time(hellaswag_sample):
    out = bench("--mode", "hellaswag", "--model", "d1", "--data", str(hellaswag_sample), "--limit", "6",
                "--hellaswag_batch_size", "4", "--repeats", "1")
    assert "6 examples" in out and "identical predictions: True" in out, out
    assert re.search(rf"^batched HellaSwag speed-up: {NUM}x$", out, re.M), out


def test_data_mode_times_the_text_and_npy_loaders(shakespeare):
    out = bench("--mode", "data", "--model", "d2", "--data", str(shakespeare), "--batches", "20", "--repeats", "1")
    rates = re.findall(rf"^(input\.txt \(tokens in memory\)|3 \.npy shards \(memory-mapped\))\s+{NUM} batches/s", out, re.M)
    assert len(rates) == 2 and all(float(r) > 0 for _, r in rates), out


def test_bad_input_is_one_line_error():
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--model", "d0x"], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown --model 'd0x'") and "Traceback" not in proc.stderr
