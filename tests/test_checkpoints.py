"""Tests of checkpoints.py: what a resume accepts, the log cut back to the resumed step, old checkpoints pruned.
All on CPU."""
import pytest

import checkpoints
import train_gpt2 as tg


@pytest.mark.parametrize(
    "saved, scaler, now, refused",
    [
        ("bfloat16", {}, "float16", "precision bfloat16 -> float16"),  # GradScaler would find no state: refused
        ("float16", {"scale": 65536.0}, "bfloat16", "precision float16 -> bfloat16"),
        (None, {}, "float16", "precision bfloat16 or float32 -> float16"),  # older checkpoints: the scaler tells fp16
        (None, {"scale": 65536.0}, "bfloat16", "precision float16 -> bfloat16"),
        (None, {}, "bfloat16", None),
        ("bfloat16", {}, "bfloat16", None),
    ],
)
def test_resume_refuses_another_precision(saved, scaler, now, refused):
    checkpoint = checkpoints.upgrade({"args": {"precision": saved} if saved else {}, "scaler": scaler, "step": 10})
    flags = {**vars(tg.parse_args(["--dtype", now])), "precision": now}
    if refused is None:
        checkpoints.check_resume_compatible(checkpoint, flags, 1)
        return
    with pytest.raises(tg.UsageError, match=refused):
        checkpoints.check_resume_compatible(checkpoint, flags, 1)


def test_log_truncation_and_pruning(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("0 val 10.0\n0 train 10.5\n1 train 9.0\n2 val 8.0\n2 hella 0.25\n2 train 8.5\n3 train 8.0\n")
    checkpoints.truncate_log(str(log), 2)
    assert log.read_text() == "0 val 10.0\n0 train 10.5\n1 train 9.0\n2 val 8.0\n2 hella 0.25\n"
    # the resumed step's epoch line is dropped too: it is logged with that step's training
    log.write_text("6 train 8.0\n7 epoch 2\n7 train 7.5\n8 val 7.0\n8 epoch 3\n8 train 7.2\n")
    checkpoints.truncate_log(str(log), 8)
    assert log.read_text() == "6 train 8.0\n7 epoch 2\n7 train 7.5\n8 val 7.0\n"
    for s in (1, 2, 3, 4):
        (tmp_path / f"model_{s:05d}.pt").write_bytes(b"x")
    (tmp_path / "model_00001.pt.keep").touch()
    assert checkpoints.prune_checkpoints(str(tmp_path), 2) == []
    assert [s for s, _ in checkpoints.list_checkpoints(str(tmp_path))] == [4, 3, 1]
    # one that cannot be deleted is reported, and the rest are still pruned
    (tmp_path / "model_00000.pt").mkdir()
    (tmp_path / "model_00005.pt").write_bytes(b"x")
    failed = checkpoints.prune_checkpoints(str(tmp_path), 1)
    assert len(failed) == 1 and "model_00000.pt" in failed[0]
    assert [s for s, _ in checkpoints.list_checkpoints(str(tmp_path))] == [5, 1, 0]
