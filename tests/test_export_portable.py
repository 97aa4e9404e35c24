"""Exports that load without diffuse: format=llama (a stock LlamaForCausalLM), checked in a fresh interpreter that
never imports diffuse, against diffuse's own logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import OFFLINE, REPO, call_main, error_lines, tiny_args
from diffuse.export import export
from diffuse.run.load import load_run

TEXT = "The quick fox — naïve café"

# run in a fresh interpreter: transformers alone (diffuse must stay unimported), logits saved for the test
STOCK = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = tok([sys.argv[3]], return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(ids).logits
assert not any(m == "diffuse" or m.startswith("diffuse.") for m in sys.modules), "diffuse was imported"
torch.save({"ids": ids, "logits": logits, "class": type(model).__name__}, out)
"""


def stock_logits(folder, tmp_path) -> dict:
    out = tmp_path / "stock.pt"
    proc = subprocess.run([sys.executable, "-c", STOCK, str(folder), str(out), TEXT], cwd=tmp_path,
                          env={**OFFLINE, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def ar_ckpt(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("ar")
    result = call_main("diffuse.train", *tiny_args(corpus, run, "objective=autoregressive", "trainer.max_steps=2",
                                                   "model.rope_base=500"))
    assert result.returncode == 0, result
    return run / "checkpoints" / "last.ckpt"


def test_an_ar_transformer_exports_as_a_stock_llama(ar_ckpt, tmp_path):
    folder = export(str(ar_ckpt), str(tmp_path / "llama"), format="llama")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    stock = stock_logits(folder, tmp_path)
    assert stock["class"] == "LlamaForCausalLM"
    _, tok, module = load_run(str(ar_ckpt))
    ids = stock["ids"]
    assert ids[0].tolist() == [tok.bos_token_id] + tok(TEXT)["input_ids"]  # BOS first, as in training rows
    with torch.no_grad():
        ours = module.backbone.logits(module.backbone(ids=ids, causal=True))
    assert (stock["logits"] - ours).abs().max() < 1e-5
    assert not torch.equal(ours[:, 1], ours[:, 2])  # a real model: the test can fail


def test_format_llama_refuses_a_diffusion_run_in_one_line(debug_run, tmp_path):
    result = call_main("diffuse.export", f"ckpt={debug_run / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'x'}",
                       "format=llama")
    assert result.returncode == 2, result
    assert error_lines(result.stderr) == ["error: format=llama exports a causal LM (objective=autoregressive); this "
                                          "run is objective=masked_discrete"]
    assert not (tmp_path / "x").exists()
