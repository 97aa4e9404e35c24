"""A run directory holds one run's outputs, complete and unmixed: a lock against a
second writer, unique default dirs, resume that refuses a missing checkpoint, temp files cleaned,
durable checkpoint writes, one row per step in metrics.csv, changed optimisation keys said and used,
and a finished run's metrics kept by a resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import yaml

from conftest import OFFLINE, REPO, call_main, error_lines, tiny_args
from diffuse.run import rundir
from diffuse.run.checkpoint import AtomicCheckpointIO


def train(corpus, run_dir, *extra):
    return call_main("diffuse.train", *tiny_args(corpus, run_dir, "callbacks.progress_bar=null", *extra))


def csv_rows(run_dir, key="train/loss"):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get(key)]


def test_a_second_writer_is_refused_before_it_touches_the_run_dir(corpus, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from diffuse.run import rundir; rundir.acquire({str(run_dir)!r}); print('held', flush=True); "
                               "import time; time.sleep(60)"],
        env={**os.environ, **OFFLINE}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = train(corpus, run_dir)
        lines = error_lines(result.stderr)
        assert result.returncode == 2 and len(lines) == 1, result
        assert f"pid {holder.pid}" in lines[0] and str(run_dir) in lines[0]
        assert not (run_dir / ".hydra").exists() and not (run_dir / "checkpoints").exists()  # nothing overwritten
    finally:
        holder.kill()
        holder.wait()
    assert train(corpus, run_dir).returncode == 0  # the holder died: its lock died with it


def test_the_lock_is_released_after_a_run_and_after_a_failed_run(corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert train(corpus, run_dir, "data.seq_len=-1").returncode == 2  # fails inside the run
    assert train(corpus, run_dir).returncode == 0
    assert train(corpus, run_dir, "resume=true", "trainer.max_steps=6").returncode == 0
    rundir.acquire(run_dir)  # while this process holds it, another is refused with its holder named
    try:
        other = subprocess.run([sys.executable, "-c", f"from diffuse.run import rundir; rundir.acquire({str(run_dir)!r})"],
                               env={**os.environ, **OFFLINE}, capture_output=True, text=True)
        assert other.returncode != 0 and f"in use by pid {os.getpid()}" in other.stderr
    finally:
        rundir.release(run_dir)


def test_default_run_dirs_are_unique_to_the_microsecond():
    dirs = yaml.safe_load((REPO / "conf" / "train.yaml").read_text())["hydra"]
    assert dirs["run"]["dir"].endswith("%H-%M-%S-%f}") and dirs["sweep"]["dir"].endswith("%H-%M-%S-%f}")


def test_resume_without_a_checkpoint_is_an_error(corpus, tmp_path):
    result = train(corpus, tmp_path / "typo", "resume=true")
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and "resume=true" in lines[0] and "last.ckpt" in lines[0]
    assert not (tmp_path / "typo" / "checkpoints").exists()


def test_temp_files_are_removed_on_start_and_never_left_by_a_failed_write(corpus, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = [run_dir / "checkpoints" / ".last.ckpt.4242.tmp", run_dir / ".metrics.json.tmp"]
    for f in stale:
        f.write_bytes(b"half a file")
    assert train(corpus, run_dir).returncode == 0
    assert not any(f.exists() for f in stale)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"x": 1}, tmp_path / "out" / "a.ckpt")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_checkpoint_is_fsynced_before_and_after_its_rename(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    AtomicCheckpointIO().save_checkpoint({"x": torch.ones(2)}, tmp_path / "a.ckpt")
    assert len(calls) == 2  # the file, then its folder
    assert torch.load(tmp_path / "a.ckpt", weights_only=True)["x"].tolist() == [1.0, 1.0]


def test_steps_replayed_after_a_resume_appear_once_in_metrics_csv(corpus, tmp_path):
    run_dir, step4 = tmp_path / "run", tmp_path / "step4.ckpt"
    assert train(corpus, run_dir, "trainer.max_steps=4", "trainer.val_check_interval=2").returncode == 0
    step4.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    assert train(corpus, run_dir, "trainer.max_steps=6", "trainer.val_check_interval=2", "resume=true").returncode == 0
    # back to step 4 in the same dir: steps 4 and 5 run again
    assert train(corpus, run_dir, "trainer.max_steps=6", "trainer.val_check_interval=2",
                 f"ckpt_path={step4}").returncode == 0
    counts = Counter(int(r["step"]) for r in csv_rows(run_dir))
    assert counts and max(counts.values()) == 1, counts
    assert max(counts) >= 5
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no last-v1


def test_changed_optimisation_keys_are_said_used_and_recorded(corpus, tmp_path):
    run_dir = tmp_path / "run"
    base = ["trainer.max_steps=4", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0"]
    assert train(corpus, run_dir, *base, "optim.lr=1e-3").returncode == 0
    result = train(corpus, run_dir, *base[1:], "trainer.max_steps=6", "optim.lr=0.25", "resume=true")
    assert result.returncode == 0, result
    said = [line for line in result.stderr.splitlines() + result.stdout.splitlines() if "changed optimisation" in line]
    assert len(said) == 1 and "optim.lr: 0.001 in the checkpoint → 0.25" in said[0]
    lrs = [float(r["lr-AdamW/pg1"]) for r in csv_rows(run_dir, "lr-AdamW/pg1") if int(r["step"]) >= 4]
    assert lrs and all(lr == pytest.approx(0.25) for lr in lrs)  # constant schedule: the given lr is the lr
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["optim"]["lr"] == 0.25
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["diffuse"]["config"]["optim"]["lr"] == 0.25


def test_another_optimizer_cannot_resume_the_state_of_the_first(corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert train(corpus, run_dir).returncode == 0
    result = train(corpus, run_dir, "resume=true", "optim._target_=torch.optim.Adam")
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and "optim._target_=torch.optim.Adam" in lines[0]


def test_a_finished_run_keeps_its_metrics_when_resumed(corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert train(corpus, run_dir).returncode == 0
    before = json.loads((run_dir / "metrics.json").read_text())
    time.sleep(0.01)
    assert train(corpus, run_dir, "resume=true").returncode == 0  # nothing left to train
    after = json.loads((run_dir / "metrics.json").read_text())
    for key in ("train/loss", "train/tokens_per_sec", "val/nelbo"):
        assert after[key] == pytest.approx(before[key], rel=1e-6), key


def test_a_resume_reads_its_checkpoint_file_once(corpus, tmp_path, monkeypatch):
    import diffuse.run.checkpoint

    run_dir = tmp_path / "run"
    assert train(corpus, run_dir).returncode == 0
    reads = []
    real = diffuse.run.checkpoint.safe_load
    monkeypatch.setattr(diffuse.run.checkpoint, "safe_load", lambda path, *a, **k: reads.append(str(path)) or real(path, *a, **k))
    result = train(corpus, run_dir, "resume=true", "trainer.max_steps=7")
    assert result.returncode == 0, result
    assert reads == [str(run_dir / "checkpoints" / "last.ckpt")]  # the entry point's read served Lightning's resume
