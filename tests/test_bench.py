"""bench.py's modes on tiny settings, in-process (one real process for the error line). No timing is checked: what
is checked is what must hold at any speed. KV cache vs no cache and chunked vs full loss are test_train_gpt2's."""
import re
import subprocess
import sys
import types

import pytest
import torch

import bench
from conftest import ROOT, run_env

NUM = r"([0-9]+(?:\.[0-9]+)?)"
ROW = rf"^(\S.*)\n +{NUM} tok/s \| {NUM} ms/step \| {NUM} GFLOP/s \| MFU {NUM}% of measured fp32 .* \| loss {NUM}$"
TINY = ["--model", "d2", "--batch_size", "2", "--seq_len", "32", "--dtype", "float32", "--compile", "0"]


def run(capsys, *argv):
    """bench.py in-process on the CPU (its --device auto picks a GPU where there is one: other rows, other lines)."""
    bench.main(["--device", "cpu", *map(str, argv)])
    return capsys.readouterr().out


@pytest.fixture
def small_matmul_peak(monkeypatch):
    # the CPU's matmul peak at 2048^3 (4 matmuls a round) costs more time than the d2 steps it rates
    peak = bench.cpu_matmul_peak
    monkeypatch.setattr(bench, "cpu_matmul_peak", lambda dtype: peak(dtype, n=256))


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # one thread here and in bench's child processes, as run_env gives ours: on 2 shared cores OpenMP threads wait
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_rows(out):
    rows = re.findall(ROW, out, re.M)
    for name, tok_s, ms, *_ in rows:  # B x T = 64 tokens a step
        assert float(tok_s) * float(ms) / 1000 == pytest.approx(64, rel=0.01), name
    return {name: float(loss) for name, *_, loss in rows}


def test_compare_hf_trains_transformers_model_beside_ours(capsys, small_matmul_peak):
    out = run(capsys, *TINY, "--steps", 1, "--compare", "hf")
    losses = train_rows(out)
    assert len(losses) == 3 and "GPT2LMHeadModel" in out and "peak RSS" in out, out
    # the two fp32 hf rows start from the same weights and differ only in AdamW's kernel (foreach vs fused)
    hf = [loss for name, loss in losses.items() if name.startswith("hf")]
    assert hf[0] == pytest.approx(hf[1], abs=2e-4), losses
    assert re.fullmatch(rf"ratio vs hf fp32: {NUM}  vs hf same settings: {NUM}", out.strip().splitlines()[-1]), out


def test_ladder_without_compile_runs_its_rungs_on_the_same_weights(capsys, small_matmul_peak):
    out = run(capsys, *TINY, "--steps", 1, "--compare", "ladder")
    losses = list(train_rows(out).values())
    # same seed, same batch, same steps: the fp32 rungs differ only in rounding (fused AdamW, the chunked loss)
    assert len(losses) >= 3 and max(losses) - min(losses) < 2e-4, out
    assert re.search(rf"^speed-up over the first: 1\.00x(, {NUM}x){{{len(losses) - 1}}}$", out, re.M), out


def test_memory_mode_peak_is_lower_with_the_chunked_loss(capsys):
    # B x T x vocab fp32 logits are 200 MiB here: the full-logits step holds several of them, the chunked loss
    # none (peak RSS is printed to 0.01 GiB: a smaller batch can print the same number for both)
    out = run(capsys, "--mode", "memory", *TINY[:2], "--batch_size", 8, "--seq_len", 128, "--dtype", "float32",
              "--steps", 1, "--repeats", 1)
    peaks = re.findall(rf"^(full logits|chunked loss) .*? fp32: peak RSS {NUM} GiB", out, re.M)
    assert [p[0] for p in peaks] == ["full logits", "chunked loss"], out
    assert float(peaks[1][1]) < float(peaks[0][1]), out
    assert re.search(rf"peak memory with the chunked loss: -{NUM}%", out), out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sample_mode_finds_the_same_tokens_with_and_without_the_cache(capsys, dtype):
    out = run(capsys, "--mode", "sample", "--model", "d1", "--batch_size", 1, "--max_new_tokens", 8, "--repeats", 1,
              "--dtype", dtype)
    checks = re.findall(r"^tokens with and without the cache, (fp32|bf16).*?: (.*)$", out, re.M)
    assert [c[0] for c in checks] == (["fp32"] if dtype == "float32" else ["bf16", "fp32"]), out
    # bf16 may flip near-ties, never more; fp32 without autocast decodes the same tokens
    assert checks[-1][1] == "identical" and re.match("identical|.*near-ties that rounding flips$", checks[0][1]), out
    assert re.search(rf"^sampling speed-up with the KV cache: {NUM}x$", out, re.M), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_check_tells_a_near_tie_from_a_real_mismatch(dtype):
    torch.manual_seed(0)
    model = bench.GPT(bench.model_config("d1")).eval()
    decoded = bench.decode(model, torch.tensor([[15496, 11, 314]]), 3, torch.float32, cache=False)
    assert bench.token_check(model, decoded, decoded.clone(), dtype, 3) == "identical"
    with torch.no_grad():
        logits = model(decoded[:, :4])[0][0, -1, : bench.GPT2_VOCAB]
    wrong = decoded.clone()
    wrong[0, 4] = logits.argmin()  # the least likely token, at new token 1
    line = bench.token_check(model, wrong, decoded, dtype, 3)
    assert line.startswith("1 of 1 sequence(s) differ; the worst: sequence 0 from new token 1") and \
        line.endswith("a real mismatch"), line
    # a token whose lm_head row (tied to wte) equals the chosen one's scores exactly the same: a tie
    twin = int(logits.argmin())
    with torch.no_grad():
        model.lm_head.weight[twin] = model.lm_head.weight[decoded[0, 4]]
    assert bench.token_check(model, wrong, decoded, dtype, 3).endswith("near-ties that rounding flips")


def test_bad_input_is_one_line_error():
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--device", "cpu", "--model", "d0x"], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown --model 'd0x'") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, error", [
    (["--mode", "sample", "--fsdp"], "--procs and --fsdp are for --mode memory"),
    (["--mode", "sample", "--model", "d1", "--max_new_tokens", 1017], "--max_new_tokens 1017 plus the 8-token prompt "
     "is longer than block_size 1024"),
    (["--mode", "memory", "--model", "d1", "--seq_len", 1025], "--seq_len 1025 is longer than the model's block_size "
     "1024"),
])
def test_bad_flags_are_one_line_errors_before_any_work(capsys, argv, error):
    with pytest.raises(SystemExit) as e:
        bench.main([str(a) for a in argv])
    assert e.value.code == 2 and capsys.readouterr() == ("", f"error: {error}\n")


def test_data_mode_times_both_orders_cold_and_warm_against_an_h100_micro_step(capsys):
    out = run(capsys, "--mode", "data", "--shards", 2, "--shard_tokens", 200000, "--batches", 5, "--repeats", 1,
              "--batch_size", 4, "--seq_len", 64, "--gap_ms", 1)
    rows = re.findall(rf"^(in order|--shuffle), (cold|warm) pages +{NUM}us +{NUM}us +{NUM}us +([0-9.e+]+)%$", out, re.M)
    assert [r[:2] for r in rows] == [("in order", "cold"), ("in order", "warm"), ("--shuffle", "cold"),
                                     ("--shuffle", "warm")], out
    # the floor: ~6 FLOPs per parameter (124M) and token, 4 x 64 tokens, at the H100 SXM's 989 TFLOP/s bf16 peak
    floor_ms = float(re.search(rf"micro-step of 4 x 64 takes at least {NUM} ms on an H100 SXM", out)[1])
    assert floor_ms == pytest.approx(6 * 124e6 * 4 * 64 / 989e12 * 1000, rel=0.02), out
    for r in rows:  # each share is its median over that floor
        assert float(r[5]) == pytest.approx(100 * float(r[2]) / 1000 / floor_ms, rel=0.02), r
    assert len(re.findall(rf"^--shuffle / in order, (cold|warm): {NUM}x$", out, re.M)) == 2, out


def test_recipe_mode_reports_where_each_curve_reaches_the_gpt2_recipes_final_loss(capsys, tmp_path):
    out = run(capsys, "--mode", "recipe", *TINY[:2], "--batch_size", 4, "--seq_len", 32, "--accum", 1,
              "--recipe_steps", 3, "--dtype", "float32", "--recipes", "gpt2", "--log_root", tmp_path,
              # 512 val tokens (4 batches) instead of 8192: each of d2's forwards is mostly its 50304-row lm_head
              "--variant", "gpt2=--recipe gpt2 --val_tokens 512",
              # the full lr from step 0 instead of a 5-step warmup: it passes the gpt2 recipe's final loss early
              "--variant", "warm1=--warmup_steps 1 --val_every 1 --val_tokens 512")
    logs = {}
    for name in ("gpt2", "warm1"):  # read here, not with bench's reader
        lines = (line.split() for line in (tmp_path / name / "log.txt").read_text().splitlines())
        logs[name] = [(int(step), float(value)) for step, stream, value in lines if stream == "val"]
    assert [s for s, _ in logs["gpt2"]] == [0, 3] and [s for s, _ in logs["warm1"]] == list(range(4))
    target = logs["gpt2"][-1][1]
    assert f"target: the gpt2 recipe's final val loss {target:.4f} after 384 tokens" in out, out
    share = dict(re.findall(r"^\s+(\w+): tokens to reach the gpt2 recipe's final val loss: (\d+%|not reached)", out,
                            re.M))
    assert share["gpt2"] == "100%" and re.search(r"^\s+gpt2: .* 1\.000x gpt2's", out, re.M), out
    # linear between evaluations: after the last evaluation above the target, at or before the first at or below it
    first = next(s for s, v in logs["warm1"] if v <= target)
    at = float(share["warm1"][:-1]) / 100 * 3
    assert 0 < first < 3 and first - 1 - 0.02 < at <= first + 0.02, (share, logs)


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(0, 10.0), (5, 8.0), (10, 6.0)]
    assert bench.steps_to_reach(curve, 7.0) == 7.5 and bench.steps_to_reach(curve, 8.0) == 5
    assert bench.steps_to_reach(curve, 10.0) == 0 and bench.steps_to_reach(curve, 5.0) is None


def test_train_mode_peak_memory_of_each_variant_is_its_own(monkeypatch):
    """--mode train keeps every variant in one process: the second variant's peak must not include the first's
    weights and optimizer state (CUDA's memory counters faked: 100 bytes per model, AdamW's state 200 more after
    its first step, 50 of activations at the peak of a step)."""
    allocated, peak = [0], [0]

    def alloc(n):
        allocated[0] += n
        peak[0] = max(peak[0], allocated[0])

    def fake_run(flags, ctx, model=None):
        alloc(100)  # the weights
        return types.SimpleNamespace(ctx=ctx, optimizer=types.SimpleNamespace(param_groups=[]), state={}), None

    def fake_step(run):
        if not run.state:
            run.state["adamw"] = True
            alloc(200)
        alloc(50)  # activations, freed at the end of the step
        allocated[0] -= 50
        return 1.0, None

    monkeypatch.setattr(bench.train_gpt2, "build_run", fake_run)
    monkeypatch.setattr(bench.train_gpt2, "train_step", fake_step)
    monkeypatch.setattr(bench, "train_flags", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated[0])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak[0])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peak.__setitem__(0, allocated[0]))
    ctx = bench.common.DistContext(False, 0, 0, 1, "cuda:0")
    args = types.SimpleNamespace(model="d2", vocab_size=512)
    variants = [bench.Variant(name, torch.float32, False) for name in ("a", "b")]
    for v in variants:  # as bench_train: built and warmed up one after the other, then stepped in turns
        v.build(args, ctx, None)
        v.step()
    for _ in range(2):
        for v in variants:
            v.step()
    assert [v.peak_mem for v in variants] == [350, 350]
