"""python -m diffuse.report: a table, report.md and a PNG for a sweep; a real 2×2 multirun end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import call_main, run_cli

from diffuse.errors import DiffuseError
from diffuse.report import collect_runs, report_sweep, swept_keys


def fake_run(root: Path, name: str, overrides: list[str], metrics: dict | None):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))


def test_report_of_a_fake_sweep(tmp_path, capsys):
    for i, (w, d) in enumerate([("0.3", "20"), ("0.3", "50"), ("1.0", "20"), ("1.0", "50")]):
        metrics = None if i == 3 else {"val/nelbo": 5.0 + i, "train/consistency_loss": 0.1 * i}
        fake_run(tmp_path, str(i), ["debug=default", f"regularizer.weight={w}", f"regularizer.delta_min={d}"], metrics)
    runs = collect_runs(tmp_path)
    assert [r.name for r in runs] == ["0", "1", "2", "3"]
    assert swept_keys(runs) == ["regularizer.delta_min", "regularizer.weight"]
    report_sweep(tmp_path, "val/nelbo", tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text().splitlines()
    table = [line for line in md if line.startswith("| ") and not line.startswith("| run")]
    assert len(table) == 4
    assert table[2].split(" | ")[1:4] == ["20", "1.0", "7"]  # run 2: δmin, λ, val/nelbo
    assert table[3].split(" | ")[3].strip(" |") == ""  # the run without metrics.json has empty metrics
    assert "`debug=default`" in "\n".join(md)  # the fixed overrides are stated once
    assert (tmp_path / "out" / "val_nelbo.png").stat().st_size > 1000
    assert "4 runs" in capsys.readouterr().out


def test_report_errors_are_one_line(tmp_path):
    with pytest.raises(DiffuseError, match="not a directory"):
        report_sweep(tmp_path / "missing")
    with pytest.raises(DiffuseError, match="no runs"):
        report_sweep(tmp_path)
    fake_run(tmp_path, "0", ["a=1"], {"val/nelbo": 1.0})
    with pytest.raises(DiffuseError, match="--metric val/nope"):
        report_sweep(tmp_path, "val/nope")


def test_two_by_two_multirun_then_report(tmp_path, corpus):
    sweep = tmp_path / "sweep"
    done = call_main(
        "diffuse.train", "-m", "debug=default", "regularizer=cdlm_consistency", "regularizer.weight=0.3,1.0",
        "regularizer.delta_min=20,50", f"hydra.sweep.dir={sweep}",
        # as small as a run gets: byte tokenizer on a small file, two steps, no checkpoints or samples
        "data=text", f"data.path={corpus}", "tokenizer=byte", "num_samples=0",
        "trainer.max_steps=2",  # < val_check_interval: the final validation runs after fit
        "trainer.limit_val_batches=1", "callbacks.best_checkpoint=null", "callbacks.last_checkpoint=null",
    )
    assert done.returncode == 0, done
    finals = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert len(finals) == 4
    assert all({"val/nelbo", "train/loss", "train/consistency_loss"} <= set(m) for m in finals)

    out = run_cli("diffuse.report", str(sweep), timeout=120)  # the real CLI, in its own interpreter
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 4
    assert all(len(line.split("│")) > 4 for line in rows)
    md = (sweep / "report.md").read_text()
    assert "| regularizer.delta_min | regularizer.weight | val/nelbo |" in md
    assert (sweep / "val_nelbo.png").is_file()
