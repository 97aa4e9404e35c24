"""kill -9 with the defaults (issue 24): `last.ckpt` is written every N steps or every T seconds, whichever comes
first, so a run killed before its first step interval resumes from where it was; `metrics.csv` holds each
(step, metric) once across kills and resumes; a new run over a finished one is refused unless `overwrite=true`.

The killed runs are the real entry point (`python -m diffuse.train` in its own session, `kill -9` of the group)
paused at a known point by a test callback (imported through PYTHONPATH=tests), never a blind sleep.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from conftest import OFFLINE, REPO, call_main, error_lines, tiny_args
from diffuse.errors import DiffuseError
from diffuse.run import rundir
from diffuse.run.callbacks.csv_logger import RunCSVLogger
from diffuse.run.callbacks.guard import FiniteModelCheckpoint

TESTS = Path(__file__).resolve().parent
STEP_INTERVAL = 40
RUN = ["trainer.max_steps=60", f"trainer.val_check_interval={STEP_INTERVAL}", "model.d_model=32",
       "callbacks.progress_bar=null", "+callbacks.slow._target_=test_kill_resume.SlowSteps"]


class SlowSteps(L.Callback):
    """Test helper: each step takes at least `seconds`, so STEP_INTERVAL steps outlast a 1 s time interval however
    fast the machine is."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        time.sleep(self.seconds)


class PauseWhenSaved(L.Callback):
    """Test helper: at the first step that starts once `checkpoint` exists, write the step into `marker` and sleep
    (nothing is written after it), so the test can kill -9 the run at a known point."""

    def __init__(self, checkpoint: str, marker: str):
        self.checkpoint, self.marker = Path(checkpoint), Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.checkpoint.is_file():
            self.marker.write_text(str(trainer.global_step))
            time.sleep(600)


def start(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, **OFFLINE, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:  # a file, not a pipe: a paused process never blocks on a full pipe
        return subprocess.Popen([sys.executable, "-m", "diffuse.train", *args], cwd=REPO, env=env, text=True,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc: subprocess.Popen, marker: Path, log: Path, timeout: float = 120) -> int:
    """Wait for `marker` (written by a pausing callback), kill -9 the run's process group; the step it paused at."""
    try:
        deadline = time.monotonic() + timeout
        while not marker.is_file() or not marker.read_text():
            assert proc.poll() is None, f"the run ended before pausing:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the run did not pause in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return int(marker.read_text())


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def step_metric_counts(run_dir: Path) -> Counter:
    """(step, metric) → rows holding it; `epoch` is Lightning's bookkeeping on every row (a step's training and
    validation rows both carry it, uninterrupted runs too), not a metric."""
    return Counter((int(float(r["step"])), k) for r in rows(run_dir) for k, v in r.items()
                   if v != "" and k not in ("step", "epoch"))


def saved_step(run_dir: Path) -> int:
    return int(torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"])


@pytest.fixture(scope="module")
def killed_twice(corpus, tmp_path_factory):
    """One run killed -9 (a) after its first time interval, before its first step interval; resumed and killed
    (b) after its step interval; resumed to the end. Every start is `python -m diffuse.train`."""
    root = tmp_path_factory.mktemp("kill")
    run_dir, out, timings = root / "run", {}, {}
    last = run_dir / "checkpoints" / "last.ckpt"

    t = time.perf_counter()  # (a): a 1 s interval; steps of ≥ 0.05 s reach step 40 after ≥ 2 s
    proc = start(*tiny_args(corpus, run_dir, *RUN, "callbacks.last_checkpoint.every_n_seconds=1",
                            "+callbacks.pause._target_=test_kill_resume.PauseWhenSaved", f"+callbacks.pause.checkpoint={last}",
                            f"+callbacks.pause.marker={root / 'a'}"), log=root / "a.log")
    out["paused_a"] = kill_when(proc, root / "a", root / "a.log")
    out["saved_a"] = saved_step(run_dir)
    out["rows_a"] = step_metric_counts(run_dir)
    timings["(a) until kill -9"] = time.perf_counter() - t

    t = time.perf_counter()  # (b): steps only (a 600 s interval never comes), paused in step 45
    proc = start(*tiny_args(corpus, run_dir, *RUN, "resume=true", "callbacks.last_checkpoint.every_n_seconds=600",
                            "+callbacks.pause._target_=test_ddp.PauseAtStep", "+callbacks.pause.step=45",
                            f"+callbacks.pause.marker={root / 'b'}"), log=root / "b.log")
    kill_when(proc, root / "b", root / "b.log")
    out["log_b"] = (root / "b.log").read_text()
    out["saved_b"] = saved_step(run_dir)
    out["rows_b"] = step_metric_counts(run_dir)
    timings["(b) resume until kill -9"] = time.perf_counter() - t

    t = time.perf_counter()
    proc = start(*tiny_args(corpus, run_dir, *RUN, "resume=true"), log=root / "c.log")
    proc.wait(timeout=180)
    out["log_c"] = (root / "c.log").read_text()
    out["rc_c"] = proc.returncode
    out["saved_c"] = saved_step(run_dir)
    timings["resume to the end"] = time.perf_counter() - t
    out["run_dir"] = run_dir
    print(timings)
    return out


def test_a_run_killed_before_its_first_step_interval_resumes_from_its_time_checkpoint(killed_twice):
    # (a) last.ckpt came from the time interval, before the 40-step interval, at the step the run was killed in
    assert 0 < killed_twice["saved_a"] < STEP_INTERVAL, killed_twice["saved_a"]
    assert killed_twice["saved_a"] == killed_twice["paused_a"]  # nothing lost beyond the interval
    assert "does not exist" not in killed_twice["log_b"]
    # its resume went on from there, not from 0: no step before the checkpoint was trained (logged) twice
    assert killed_twice["rows_b"][(killed_twice["saved_a"] - 1, "train/loss")] == 1
    assert max(killed_twice["rows_b"].values()) == 1, killed_twice["rows_b"].most_common(3)


def test_a_run_killed_after_a_step_interval_resumes_from_it_and_finishes(killed_twice):
    assert killed_twice["rc_c"] == 0, killed_twice["log_c"][-3000:]
    # (b) the step interval's checkpoint (the paused run reached 45)
    assert killed_twice["saved_b"] == STEP_INTERVAL, killed_twice["log_b"][-3000:]
    assert killed_twice["rows_b"][(44, "train/loss")] == 1  # logged before the kill, replayed after it
    assert killed_twice["saved_c"] == 60


def test_metrics_csv_holds_every_step_once_after_two_kills(killed_twice):
    assert killed_twice["rc_c"] == 0, killed_twice["log_c"][-3000:]
    counts = step_metric_counts(killed_twice["run_dir"])
    assert max(counts.values()) == 1, [c for c in counts.most_common(5)]
    assert sorted(s for s, k in counts if k == "train/loss") == list(range(60))  # nothing lost, nothing twice
    assert {s for s, k in counts if k == "val/nelbo"} == {STEP_INTERVAL - 1, 60}  # the interval's, the final one


# -- a new run over a finished one -------------------------------------------------------------------------------
def train(corpus, run_dir, *extra):
    return call_main("diffuse.train", *tiny_args(corpus, run_dir, "callbacks.progress_bar=null", *extra))


def test_a_new_run_over_a_finished_one_is_refused_unless_overwrite(corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert train(corpus, run_dir).returncode == 0
    config = (run_dir / ".hydra" / "config.yaml").read_bytes()
    checkpoint = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    refused = train(corpus, run_dir, "trainer.max_steps=7")
    lines = error_lines(refused.stderr)
    assert refused.returncode == 2 and len(lines) == 1, refused
    assert str(run_dir) in lines[0] and "resume=true" in lines[0] and "hydra.run.dir" in lines[0], lines
    assert "overwrite=true" in lines[0] and "last.ckpt" in lines[0]
    # refused before Hydra rewrote .hydra/ and before anything was trained or written
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == checkpoint
    assert max(step_metric_counts(run_dir).values()) == 1

    again = train(corpus, run_dir, "trainer.max_steps=7", "overwrite=true")
    assert again.returncode == 0, again
    counts = step_metric_counts(run_dir)
    assert max(counts.values()) == 1 and sorted(s for s, k in counts if k == "train/loss") == list(range(7))
    assert saved_step(run_dir) == 7


def test_only_hydra_files_and_logs_are_not_a_run(corpus, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run_dir / "train.log").write_text("a log\n")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "metrics.csv").write_text("epoch,step,train/loss\n")  # a header: nothing trained yet
    assert rundir.held_run(run_dir) is None
    assert train(corpus, run_dir).returncode == 0
    assert rundir.held_run(run_dir) == "checkpoints/last.ckpt and metrics.csv up to step 4"


def test_the_check_without_hydras_callback(tmp_path):
    """Multirun jobs and the compose API skip the RunDirLock callback: the run itself (fit.starting_point) checks."""
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss\n0,3,1.5\n")
    for cfg in ({"resume": True}, {"ckpt_path": "x.ckpt"}):
        rundir.check_new_run(OmegaConf.create(cfg), tmp_path)  # a resume may
    with pytest.raises(DiffuseError, match="left no checkpoint to resume.*overwrite=true"):
        rundir.check_new_run(OmegaConf.create({"init_from": "teacher.ckpt"}), tmp_path)
    rundir.check_new_run(OmegaConf.create({"overwrite": True}), tmp_path)
    assert not (tmp_path / "metrics.csv").exists()


# -- units ---------------------------------------------------------------------------------------------------------
def test_a_row_torn_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,train/loss\n0,1.0\n1,0.9\n2,0.")  # killed in the middle of an append
    logger = RunCSVLogger(save_dir=tmp_path, name="", version="")
    assert logger.forget_steps_from(2) == 1
    assert path.read_text() == "step,train/loss\n0,1.0\n1,0.9\n"
    path.write_text("step,train/loss\n0,1.0\n1,0.")
    logger.log_metrics({"train/loss": 0.5}, step=1)  # appended at once, after the torn row was dropped
    assert path.read_text() == "step,train/loss\n0,1.0\n1,0.5\n"


def test_every_n_seconds_is_checked(tmp_path):
    with pytest.raises(DiffuseError, match="every_n_seconds=0"):
        FiniteModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_seconds=0)
    with pytest.raises(DiffuseError, match="save_last"):
        FiniteModelCheckpoint(dirpath=tmp_path, save_top_k=0, every_n_seconds=5)
    plain = FiniteModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=200)
    timed = FiniteModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=200,
                                  every_n_seconds=60)
    assert timed.state_key == plain.state_key  # runs written before the time interval resume their state
    assert timed.state_key.startswith("ModelCheckpoint{")
