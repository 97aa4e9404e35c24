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


def test_report_reads_each_runs_evaluation(tmp_path):
    for i, ppl in enumerate([30.0, 20.0]):
        fake_run(tmp_path, str(i), [f"regularizer.weight={i}"], {"val/nelbo": 4.0})
        fake_run(tmp_path / str(i), "eval", [f"ckpt={tmp_path}/{i}/checkpoints/last.ckpt", "steps=[8,64]"], None)
        sweep = [{"steps": 8, "gen_ppl": ppl, "entropy": 4.0}, {"steps": 64, "gen_ppl": ppl / 2, "entropy": 4.1}]
        (tmp_path / str(i) / "eval" / "eval.json").write_text(json.dumps({"sweep": sweep}))
    runs = report_sweep(tmp_path, "eval/gen_ppl@8", tmp_path / "out")
    assert [r.name for r in runs] == ["0", "1"]  # each run's eval/.hydra is part of the run, not a run
    assert runs[1].metrics["eval/gen_ppl@64"] == 10.0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| eval/gen_ppl@8 | val/nelbo | eval/entropy@8 | eval/entropy@64 | eval/gen_ppl@64 |" in md
    assert "| 1 | 1 | 20 | 4 | 4 | 4.1 | 10 |" in md
    assert (tmp_path / "out" / "eval_gen_ppl@8.png").is_file()


def test_report_over_several_sweeps_names_runs_by_their_path(tmp_path):
    fake_run(tmp_path / "baseline", "0", ["regularizer=none"], {"val/nelbo": 4.0})
    for i in range(2):
        fake_run(tmp_path / "sweep", str(i), ["regularizer=cdlm_consistency", f"regularizer.weight={i}"], {"val/nelbo": 5.0})
    runs = collect_runs(tmp_path)
    assert [r.name for r in runs] == ["baseline/0", "sweep/0", "sweep/1"]
    assert swept_keys(runs) == ["regularizer", "regularizer.weight"]
    report_sweep(tmp_path, "val/nelbo", tmp_path / "out", plot=False)
    assert "| baseline/0 | none |" in (tmp_path / "out" / "report.md").read_text()
    assert not list((tmp_path / "out").glob("*.png"))


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


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    return path


def test_curves_put_runs_on_one_plot_against_epochs(tmp_path):
    from diffuse.analysis.curves import draw_curves

    a = write_csv(tmp_path / "a", [{"step": 10, "train/epochs": 2.0}, {"step": 10, "val/bpt": 5.0},
                                   {"step": 20, "val/bpt": 4.0}])
    b = write_csv(tmp_path / "b", [{"step": 5, "train/epochs": 0.5}, {"step": 20, "val/bpt": 6.0}])
    series = draw_curves([a, b], "val/bpt", "epochs", tmp_path / "out")
    assert series == {"a": [(10, 2.0, 5.0), (20, 4.0, 4.0)], "b": [(20, 2.0, 6.0)]}
    assert (tmp_path / "out" / "curves_val_bpt.png").stat().st_size > 1000
    assert "b,20,2.0000,6" in (tmp_path / "out" / "curves_val_bpt.csv").read_text()
    with pytest.raises(DiffuseError, match="no column 'val/nope'"):
        draw_curves([a], "val/nope")
    c = write_csv(tmp_path / "c", [{"step": 5, "val/bpt": 6.0}])
    with pytest.raises(DiffuseError, match="no train/epochs"):
        draw_curves([c], "val/bpt", "epochs", tmp_path / "out")


def test_a_data_constrained_run_logs_epochs_and_draws_curves(tmp_path, corpus):
    from conftest import tiny_args

    run = tmp_path / "run"
    # 320 tokens = 10 rows of 32; batch 4 → 0.4 epochs per step
    done = call_main("diffuse.train", *tiny_args(corpus, run, "data.train_tokens=320", "trainer.max_steps=5"))
    assert done.returncode == 0, done
    out = run_cli("diffuse.report", "--curves", str(run), str(run), "--labels", "x,y", "--metric", "val/bpt",
                  "--x", "epochs", "--out", str(tmp_path / "out"), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "out" / "curves_val_bpt.csv").read_text().splitlines()
    assert text[1].startswith("x,4,2.0000,")  # validation after 5 steps (logged at step index 4) = 2 passes over 10 rows
    bad = run_cli("diffuse.report", str(run), str(run), timeout=60)
    assert bad.returncode != 0 and "several runs need --curves" in bad.stderr
