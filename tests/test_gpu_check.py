"""experiments/bench/gpu_check.py (the GPU check) on CPU: its arguments, and a section end to end at a
micro size, with the mamba-ssm column reported as skipped. The GPU run itself is gpu_check.sh on a GPU machine."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402


def test_arguments_name_a_cpu_tiny_report_and_refuse_unknown_sections(capsys):
    args = gpu_check.parse_args(["--device", "cpu", "--tiny", "--sections", "p4, masks"])
    assert args.sections == ["p4", "masks"]
    assert Path(args.out).parent == BENCH and Path(args.out).name.endswith("-cpu-tiny.md")
    assert Path(args.out).name.startswith("gpu-")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu", "--sections", "p5"])
    assert "unknown section" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.parse_args(["--device", "cuda"])


def test_p4_runs_on_cpu_and_reports_mamba_ssm_skipped(tmp_path, monkeypatch):
    micro = replace(gpu_check.TINY, p4_lengths=(32,), p4_d_model=32, p4_layers=1, p4_d_state=8, p4_headdim=8,
                    p4_chunk=16, p4_warmup=1, p4_reps=1)
    monkeypatch.setattr(gpu_check, "TINY", micro)
    out = tmp_path / "report.md"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--sections", "p4", "--out", str(out)]) == 0
    text = out.read_text()
    assert "TINY sizes, not a GPU result" in text and "- packages: torch" in text
    assert "| 32 |" in text  # one row of timings
    assert "**p4: ok (mamba-ssm column skipped: mamba-ssm needs CUDA)**" in text
    assert "## summary" in text and "- p4: ok" in text
