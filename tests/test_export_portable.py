"""Exports that load without diffuse: format=llama (a stock LlamaForCausalLM) and format=remote (LLaDA/Dream-style
remote code), both loaded in one fresh interpreter that never imports diffuse, against diffuse's own logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import OFFLINE, call_main, error_lines, tiny_args
from diffuse.export import export
from diffuse.models.layers import BlockLayout
from diffuse.run.load import load_run

TEXT = "The quick fox — naïve café"

# a fresh interpreter, transformers alone (diffuse must stay unimported): for each (folder, remote?, extra attention
# masks), the tokenized TEXT and the logits without a mask and under each mask
STOCK = r"""
import sys, torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
jobs, out, text = torch.load(sys.argv[1]), sys.argv[2], sys.argv[3]
results = []
for folder, remote, masks in jobs:
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)  # reads config.json's auto_map too
    model = (AutoModel.from_pretrained(folder, trust_remote_code=True) if remote
             else AutoModelForCausalLM.from_pretrained(folder)).eval()
    ids = tok([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = [model(ids).logits] + [model(ids, attention_mask=m).logits for m in masks]
    results.append({"ids": ids, "logits": logits, "class": type(model).__name__,
                    "mask_id": getattr(model.config, "mask_token_id", None)})
assert not any(m == "diffuse" or m.startswith("diffuse.") for m in sys.modules), "diffuse was imported"
torch.save(results, out)
"""


def padding_and_blocks(length: int):
    padding = torch.ones(1, length, dtype=torch.long)
    padding[:, -3:] = 0
    return padding, BlockLayout.clean_blocks(torch.arange(length) // 4)  # block diffusion's block-causal pattern


@pytest.fixture(scope="module")
def exported(corpus, debug_run, tmp_path_factory):
    """An AR run exported format=llama and the masked debug run exported format=remote, loaded outside diffuse."""
    root = tmp_path_factory.mktemp("portable")
    result = call_main("diffuse.train", *tiny_args(corpus, root / "ar", "objective=autoregressive",
                                                   "trainer.max_steps=2", "model.rope_base=500"))
    assert result.returncode == 0, result
    runs = {"llama": root / "ar" / "checkpoints" / "last.ckpt", "remote": debug_run / "checkpoints" / "last.ckpt"}
    folders = {fmt: export(str(ckpt), str(root / fmt), format=fmt) for fmt, ckpt in runs.items()}
    _, tok, _ = load_run(str(runs["remote"]))
    padding, blocks = padding_and_blocks(len(tok(TEXT)["input_ids"]) + 1)
    torch.save([(str(folders["llama"]), False, []), (str(folders["remote"]), True, [padding, blocks.mask(None, 1)])],
               root / "jobs.pt")
    proc = subprocess.run([sys.executable, "-c", STOCK, str(root / "jobs.pt"), str(root / "out.pt"), TEXT],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**OFFLINE, "PATH": "/usr/bin:/bin", "HF_HOME": str(root / "hf")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs, folders, dict(zip(("llama", "remote"), torch.load(root / "out.pt")))


def test_an_ar_transformer_exports_as_a_stock_llama(exported):
    runs, folders, stock = exported
    config = json.loads((folders["llama"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert stock["llama"]["class"] == "LlamaForCausalLM"
    _, tok, module = load_run(str(runs["llama"]))
    ids = stock["llama"]["ids"]
    assert ids[0].tolist() == [tok.bos_token_id] + tok(TEXT)["input_ids"]  # BOS first, as in training rows
    with torch.no_grad():
        ours = module.backbone.logits(module.backbone(ids=ids, causal=True))
    assert (stock["llama"]["logits"][0] - ours).abs().max() < 1e-5
    assert not torch.equal(ours[:, 1], ours[:, 2])  # a real model: the test can fail


def test_a_masked_model_exports_as_remote_code_with_equal_logits(exported):
    runs, folders, stock = exported
    config = json.loads((folders["remote"] / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_diffuse.DiffuseModel"
    assert "import diffuse" not in (folders["remote"] / "modeling_diffuse.py").read_text()
    _, tok, module = load_run(str(runs["remote"]))
    theirs = stock["remote"]
    assert theirs["class"] == "DiffuseModel" and theirs["mask_id"] == tok.mask_token_id
    ids = theirs["ids"]
    padding, blocks = padding_and_blocks(ids.shape[1])
    with torch.no_grad():
        ours = [module.backbone.logits(module.backbone(ids=ids)),
                module.backbone.logits(module.backbone(ids=ids, segment_ids=padding))[:, :-3],
                module.backbone.logits(module.backbone(ids=ids, layout=blocks))]
    theirs = [theirs["logits"][0], theirs["logits"][1][:, :-3], theirs["logits"][2]]
    assert max((a - b).abs().max() for a, b in zip(ours, theirs)) < 1e-5
    assert (ours[0] - ours[2]).abs().max() > 1e-3  # the block pattern changes the logits: the test can fail


def test_format_llama_refuses_a_diffusion_run_in_one_line(debug_run, tmp_path):
    result = call_main("diffuse.export", f"ckpt={debug_run / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'x'}",
                       "format=llama")
    assert result.returncode == 2, result
    assert error_lines(result.stderr) == ["error: format=llama exports a causal LM (objective=autoregressive); this "
                                          "run is objective=masked_discrete"]
    assert not (tmp_path / "x").exists()


def test_an_exported_ar_run_starts_a2d_as_the_same_next_token_predictor(exported):
    """Our AR runs enter A2D as a causal-LM folder: format=llama, then model=hf. At annealing step 0 (causal
    attention) with the logit shift, position i's logits are the AR run's next-token logits at i − 1."""
    from diffuse.models.hf import HFCausalLM

    runs, folders, stock = exported
    _, tok, module = load_run(str(runs["llama"]))
    a2d = HFCausalLM(vocab_size=len(tok), base_model=str(folders["llama"]), logit_shift=True, anneal_steps=100)
    ids = stock["llama"]["ids"]
    with torch.no_grad():
        ar = module.backbone.logits(module.backbone(ids=ids, causal=True))
        shifted = a2d.train().logits(a2d(ids=ids))  # global_step 0: r = 0
    assert (shifted[:, 1:] - ar[:, :-1]).abs().max() < 1e-5
