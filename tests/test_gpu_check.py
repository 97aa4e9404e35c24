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
import gpu_speed  # noqa: E402


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


def micro_sizes():
    return replace(gpu_check.TINY, mask_width=32, mask_len=32, block_d_model=32, block_layers=1, block_heads=2,
                   block_seq_len=32, block_batch=2, block_steps=3, block_warmup=1, ar_d_model=32, ar_layers=1,
                   ar_heads=2, ar_vocab=64, ar_prompt=3, ar_length=16, sample_batches=(1, 4), sample_reps=1)


def run_sections(sections, tmp_path, monkeypatch, data=None):
    monkeypatch.setattr(gpu_check, "TINY", micro_sizes())
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "report.md"
    args = ["--device", "cpu", "--tiny", "--sections", sections, "--out", str(out)]
    code = gpu_check.main(args + (["--data", str(data)] if data else []))
    return code, out.read_text()


def test_kvcache_and_sampling_sections_run_on_cpu(tmp_path, monkeypatch):
    code, text = run_sections("kvcache,sampling", tmp_path, monkeypatch)
    assert code == 0, text
    assert "| cached logits = full causal forward | float32 |" in text and "ok (tol 1e-05)" in text
    assert "| 1 |" in text and "| 4 |" in text and "| True |" in text  # both batches, cached tokens = re-run ones
    assert "**kvcache: ok (batch 1: cache" in text
    for label in gpu_speed.SAMPLING_LABELS:
        assert f"| {label} |" in text
    assert "hybrid / speculative sampler: not yet in the tree" in text or "registered" in text
    assert "**sampling: ok (batch 4: fastest diffusion sampler" in text


def test_block_section_checks_masks_and_reports_flex_training_skipped_on_cpu(tmp_path, monkeypatch):
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f"Paragraph {i}: " + " ".join(f"word{i * j % 97}" for j in range(40))
                                  for i in range(60)))
    code, text = run_sections("block", tmp_path, monkeypatch, data)
    assert code == 0, text
    for kind in ("sdpa", "flex"):
        for case in ("padded rows", "packed documents"):
            assert f"| {kind} | {case} vs each alone | float32 |" in text
    assert "| flex vs sdpa | packed documents, same batch | float32 |" in text
    assert "FAILED" not in text
    assert "| sdpa |" in text  # the SDPA training ran: steps/s and losses
    assert "flex training: skipped on CPU: model.attention=flex does not train on CPU" in text
    assert "**block: ok (masks ok; flex training skipped on CPU" in text
