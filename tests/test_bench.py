"""bench.py runs its modes end to end on tiny settings and prints lines that parse. No timing is checked."""
import argparse
import re
import subprocess
import sys

import torch

import bench
from conftest import ROOT, run_env

NUM = r"([0-9]+(?:\.[0-9]+)?)"
ROW = rf"^\s+{NUM} tok/s \| {NUM} ms/step \| {NUM} GFLOP/s \| MFU {NUM}% of measured (bf16|fp32) matmul peak .* \| loss {NUM}$"


def run_bench(*args, timeout=120):
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_train_compare_hf_prints_every_variant_and_the_ratio_line_last():
    out = run_bench("--model", "d2", "--batch_size", "2", "--seq_len", "32", "--steps", "2", "--compile", "0", "--compare", "hf")
    lines = out.strip().splitlines()
    assert re.fullmatch(rf"ratio vs hf fp32: {NUM}  vs hf same settings: {NUM}", lines[-1]), lines[-1]
    rows = re.findall(ROW, out, re.M)
    assert len(rows) == 3, out
    assert [r[4] for r in rows] == ["bf16", "fp32", "bf16"]  # the Hugging Face baseline runs in fp32
    assert all(float(r[0]) > 0 and float(r[1]) > 0 for r in rows)
    assert "GPT2LMHeadModel" in out and "peak RSS" in out
    # ours and theirs start from different random weights but train on the same tokens: both near ln(50257) ~ 10.8
    losses = [float(r[5]) for r in rows]
    assert all(5 < loss < 12 for loss in losses), losses


def test_ladder_without_compile_runs_its_rungs_on_the_same_weights():
    out = run_bench("--model", "d2", "--batch_size", "2", "--seq_len", "32", "--steps", "2", "--compile", "0",
                    "--dtype", "float32", "--compare", "ladder")
    names = re.findall(r"^(\S.*)\n" + ROW, out, re.M)
    assert [n[0] for n in names] == ["fp32, default AdamW, full logits", "+ fused AdamW", "+ chunked loss", "+ fp32 autocast"], out
    # same seed, same batch, same steps: the fp32 rungs differ only in rounding (fused AdamW, the chunked loss)
    losses = [float(n[-1]) for n in names]
    assert max(losses) - min(losses) < 2e-4, losses
    assert re.search(rf"^speed-up over the first: 1\.00x(, {NUM}x){{3}}$", out, re.M), out


def test_ladder_ends_with_our_defaults_then_build_nanogpts_full_logits_under_compile():
    args = argparse.Namespace(compile=1, loss_chunk_size=None, compare="ladder")
    ladder = bench.train_variants(args, torch.bfloat16)
    assert [(v.dtype, v.compile, v.fused, v.loss_chunk_size) for v in ladder] == [
        (torch.float32, False, False, 0),
        (torch.float32, False, True, 0),
        (torch.float32, False, True, None),
        (torch.bfloat16, False, True, None),
        (torch.bfloat16, True, True, None),  # train_gpt2.py's defaults: the loss path by device
        (torch.bfloat16, True, True, 0),  # build-nanogpt: full logits and F.cross_entropy, compiled
    ]


def test_memory_mode_reports_the_same_loss_for_full_logits_and_chunked_loss():
    out = run_bench("--mode", "memory", "--model", "d2", "--batch_size", "2", "--seq_len", "32", "--dtype", "float32", "--repeats", "1")
    rows = re.findall(rf"^(full logits|chunked loss) .*? fp32: peak RSS {NUM} GiB .*?losses ([0-9., ]+), step times", out, re.M)
    assert [r[0] for r in rows] == ["full logits", "chunked loss"] and all(float(r[1]) > 0 for r in rows), out
    full, chunked = ([float(x) for x in r[2].split(", ")] for r in rows)
    assert len(full) == len(chunked) == 2
    assert all(abs(a - b) < 1e-4 for a, b in zip(full, chunked)), (full, chunked)
    assert re.search(rf"peak memory with the chunked loss: [+-]{NUM}%", out), out


def test_sample_mode_decodes_the_same_tokens_with_and_without_the_cache():
    out = run_bench("--mode", "sample", "--model", "d1", "--max_new_tokens", "12", "--repeats", "1")
    assert "identical tokens: True" in out, out
    assert re.search(rf"^sampling speed-up with the KV cache: {NUM}x$", out, re.M), out


def test_bad_input_is_one_line_error():
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--model", "d0x"], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown --model 'd0x'") and "Traceback" not in proc.stderr


def test_data_mode_times_both_orders_cold_and_warm_against_an_h100_micro_step():
    out = run_bench("--mode", "data", "--shard_tokens", "200000", "--batches", "5", "--repeats", "1",
                    "--batch_size", "4", "--seq_len", "64", "--gap_ms", "1")
    rows = re.findall(rf"^(in order|--shuffle), (cold|warm) pages +{NUM}us +{NUM}us +{NUM}us +([0-9.e+]+)%$", out, re.M)
    assert [r[:2] for r in rows] == [("in order", "cold"), ("in order", "warm"), ("--shuffle", "cold"), ("--shuffle", "warm")], out
    # the floor: gpt2's FLOPs for 4 x 64 tokens at the H100's datasheet peak, and each share is median / floor
    floor = bench.flops_per_token(bench.model_config("gpt2"), 64) * 4 * 64 / bench.gpu_peak_flops("H100")
    assert f"a --model gpt2 micro-step of 4 x 64 takes at least {floor * 1000:.3g} ms on an H100 SXM" in out, out
    for r in rows:
        assert float(r[2]) > 0 and abs(float(r[5]) / (100 * float(r[2]) * 1e-6 / floor) - 1) < 0.01, r
    assert len(re.findall(rf"^--shuffle / in order, (cold|warm): {NUM}x$", out, re.M)) == 2, out


def test_memory_procs_fsdp_holds_half_the_parameters_and_gradients_of_ddp_per_rank():
    out = run_bench("--mode", "memory", "--procs", "2", "--fsdp", "--model", "d2", "--batch_size", "2", "--seq_len", "32",
                    "--steps", "1", "--repeats", "1", "--dtype", "float32", timeout=240)
    table = {m[0]: m[1].split() for m in re.findall(r"^(DDP|FSDP|FSDP / DDP) +([0-9. ]+)$", out, re.M)}
    assert list(table) == ["DDP", "FSDP", "FSDP / DDP"], out
    # DDP: a full fp32 copy per rank. FSDP: every dim-0 size of d2 is even, the root (wte = lm_head, wpe, ln_f) is
    # sharded too, so each of 2 ranks holds exactly half the parameters and, after a step, half the gradients
    n = sum(p.numel() for p in bench.GPT(bench.model_config("d2")).parameters())
    assert table["DDP"][0] == f"{4 * n / 2**20:.1f}", out
    assert table["FSDP / DDP"][:2] == ["0.500", "0.500"], out


def test_recipe_mode_reports_tokens_to_the_gpt2_recipes_final_loss(tmp_path):
    out = run_bench("--mode", "recipe", "--model", "d2", "--batch_size", "4", "--seq_len", "32", "--accum", "1",
                    "--recipe_steps", "5", "--steps", "1", "--dtype", "float32", "--recipes", "gpt2",
                    "--variant", "muon=--optimizer muon", "--log_root", str(tmp_path), timeout=300)
    logs = {name: bench.val_curve(tmp_path / name / "log.txt") for name in ("gpt2", "muon")}
    assert [s for s, _ in logs["gpt2"]] == [0, 5]  # --val_every 5, and the last step
    target = logs["gpt2"][-1][1]
    assert f"target: the gpt2 recipe's final val loss {target:.4f} after 640 tokens" in out
    # the gpt2 recipe reaches its own final loss at its last step; the other run where its curve crosses it
    assert re.search(r"^\s+gpt2: tokens to reach the gpt2 recipe's final val loss: 100% \| .* 1\.000x gpt2's", out, re.M), out
    muon = bench.steps_to_reach(logs["muon"], target)
    reach = f"{100 * muon / 5:.0f}%" if muon is not None else "not reached"
    assert re.search(rf"^\s+muon: tokens to reach the gpt2 recipe's final val loss: {reach} \|", out, re.M), out


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(0, 10.0), (5, 8.0), (10, 6.0)]
    assert bench.steps_to_reach(curve, 7.0) == 7.5 and bench.steps_to_reach(curve, 8.0) == 5
    assert bench.steps_to_reach(curve, 10.0) == 0 and bench.steps_to_reach(curve, 5.0) is None
