"""Tests of checks.py: each bad flag is refused with one line before any work (train_gpt2.main in this process),
an unwritable --log_dir too; Tiny Shakespeare is downloaded once, atomically."""
import io
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import pytest

import checks
import train_gpt2 as tg
from conftest import ROOT, TRAIN, flag_argv, main_error

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


def test_input_txt_is_downloaded_once_atomically(tmp_path, monkeypatch):
    path = tmp_path / "input.txt"
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"

    def urlopen(url, timeout):
        assert url == checks.SHAKESPEARE_URL and not path.exists()
        return io.BytesIO(text.encode())  # a context manager with read(), as the real response

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    checks.ensure_text_data(str(path))
    assert path.read_text() == text and os.listdir(tmp_path) == ["input.txt"]  # no temporary file left
    monkeypatch.setattr(urllib.request, "urlopen", None)  # present: no second download
    checks.ensure_text_data(str(path))
    # the write fails before the rename: no input.txt, not even a partial one
    other = tmp_path / "other" / "input.txt"
    other.parent.mkdir()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(text.encode()))
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(tg.UsageError, match="cannot write the download there .No space left on device.; pass --data"):
        checks.ensure_text_data(str(other))
    assert not other.exists()
    monkeypatch.undo()

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(tg.UsageError, match="could not download Tiny Shakespeare from .*git checkout input.txt") as e:
        checks.ensure_text_data(str(other))
    assert "\n" not in str(e.value) and not other.exists()


def test_unwritable_log_dir_is_refused_before_work(tmp_path, shakespeare):
    """A read-only directory. Root may write anywhere: as root, the check runs in a child that drops to nobody."""
    base = Path(tempfile.mkdtemp(dir=world_traversable_dir()))  # not under pytest's private (0700) directory
    try:
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir(mode=0o555)
        code, err = in_child_as_nobody(
            lambda: checks.check_args(
                tg.parse_args([str(a) for a in ["--data", shakespeare, "--log_dir", ro / "log"] + TRAIN])
            )
        )
    finally:
        shutil.rmtree(base)
    if code == 4:
        pytest.skip("root without the right to drop to another user here: no directory is read-only for this test")
    assert code == 2 and f"{ro / 'log'}: --log_dir is not writable ({ro} is read-only for this user)" in err, (
        code,
        err,
    )


def world_traversable_dir():
    """A directory we may write whose path every user can traverse (each part o+x): nobody must reach a directory
    made in it. $TMPDIR first; it may lie under a private (0700) directory, as /tmp/pytest-of-root/ is."""
    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm", str(ROOT)):
        parts = Path(candidate).resolve()
        if os.access(parts, os.W_OK) and all(p.stat().st_mode & 0o001 for p in [parts, *parts.parents]):
            return str(parts)
    pytest.skip("no writable directory that every user can reach")


def in_child_as_nobody(check):
    """(exit code, UsageError message) of check() in a forked child that runs as nobody if we are root: 0 passed,
    2 refused, 4 could not drop root. The child runs plain Python only (a fork of a threaded process)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code, message = 3, b""
        try:
            if os.getuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            check()
            code = 0
        except tg.UsageError as e:
            code, message = 2, str(e).encode()
        except OSError:
            code = 4
        finally:
            os.write(write, message)
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), message
