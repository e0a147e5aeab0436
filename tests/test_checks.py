"""Tests of checks.py: each bad flag is refused with one line before any work (train_gpt2.main in this process)."""
import pytest

import checks
from conftest import flag_argv, main_error

TINY = dict(model="d2", batch_size=4, seq_len=64, total_batch_size=256, compile=0)
# a value on the wrong side of each FLAG_RANGES bound
BAD = {">= 1": 0, ">= 0": -1, "between 0 and 1": 1.5, "> 0": 0, "in [0, 1)": 1}


@pytest.mark.parametrize("name", sorted(checks.FLAG_RANGES))
def test_every_flag_range_refuses_a_value_outside_it(name, tmp_path, shakespeare_file, capsys):
    allowed, ok = checks.FLAG_RANGES[name]
    bad = BAD[allowed]
    assert not ok(bad)
    argv = flag_argv({**TINY, "data": shakespeare_file, "log_dir": tmp_path / "log", name: bad})
    err = main_error(argv, capsys)
    assert err.startswith(f"error: --{name} must be {allowed}, got {bad}"), err
    assert not (tmp_path / "log").exists()  # refused before any work


@pytest.mark.parametrize("flags, message", [
    (dict(top_k=-5, sample="hi", init_from="gpt2"), "--top_k must be >= 0, got -5"),
    (dict(temperature=-1.0, sample="hi", init_from="gpt2"), "--temperature must be >= 0, got -1.0"),
    (dict(sample="hi"), "--init_from"),
    (dict(export="OUT"), "--init_from"),
    (dict(extend=True), "--extend continues a run: pass it with --resume"),
    (dict(dtype="float16"), "float16"),
    (dict(resume="MISSING"), "MISSING"),
])
def test_flags_users_get_wrong_first_are_one_line(flags, message, tmp_path, shakespeare_file, capsys):
    flags = {k: str(tmp_path / v) if v in ("OUT", "MISSING") else v for k, v in flags.items()}
    message = message.replace("MISSING", str(tmp_path / "MISSING"))
    argv = flag_argv({**TINY, "data": shakespeare_file, "log_dir": tmp_path / "log", **flags})
    err = main_error(argv, capsys)
    assert message in err, err
