"""model=diffusion_gemma: transformers' DiffusionGemmaForBlockDiffusion as a backbone, and sampler=entropy_bound
driving it token for token as `model.generate` does (same seed, dynamic cache) on a tiny random config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import OFFLINE, call_main
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from diffuse.contracts import UNIFORM, Backbone, EncodesCanvas
from diffuse.errors import DiffuseError
from diffuse.export import export
from diffuse.models.diffusion_gemma import DiffusionGemma
from diffuse.objectives.base import SpecialTokens
from diffuse.objectives.diffusion_gemma import DiffusionGemmaRecipe
from diffuse.run.load import load_run
from diffuse.sampling.base import left_padded
from diffuse.sampling.entropy_bound import EntropyBoundSampler
from diffuse.sampling.trace import recording
from diffuse.schedules import build_schedule

V, C = 64, 8
SPECIAL = SpecialTokens(pad=60, bos=61, eos=62, mask=63)
# vocab 64, 2 layers (one sliding of window 4, one full), 2 experts, canvas 8
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, global_head_dim=16, num_experts=2, top_k_experts=1, moe_intermediate_size=32,
            sliding_window=4, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
            pad_token_id=60, eos_token_id=62, bos_token_id=61)


@pytest.fixture(scope="module")
def gemma():
    torch.manual_seed(0)
    return DiffusionGemma(V, config=TEXT, canvas_length=C).eval()


class Stub:
    process, special = UNIFORM, SPECIAL


def both(model, prompts, length, special=SPECIAL, seed=3, **settings):
    """(diffuse's SampleOutput, transformers' generate output) under the same seed and settings."""
    sampler = EntropyBoundSampler(**settings)
    stub = Stub()
    stub.special = special
    ours = sampler.generate(model, stub, prompts, length, seed=seed)
    ids, seg = left_padded(prompts, special, "cpu")  # transformers gets the same [PAD…, BOS, prompt…] rows
    loop = sampler.loop
    torch.manual_seed(seed)
    ref = model.model.generate(
        ids, attention_mask=seg > 0, max_new_tokens=length, max_denoising_steps=loop.steps, t_min=loop.t_min,
        t_max=loop.t_max, stability_threshold=loop.stable, confidence_threshold=loop.confidence,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=loop.gamma), pad_token_id=special.pad,
        eos_token_id=special.eos)
    new = ref.sequences[:, ids.shape[1]:]  # generate stops once every row is finished: PAD for the rest
    return ours, ref, torch.cat([new, new.new_full((len(prompts), length - new.shape[1]), special.pad)], 1)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [9, 9, 9, 9]]
CASES = {  # (prompts, length, sampler settings)
    "entropy_bound": ([PROMPTS[0]], 16, dict(gamma=0.1, steps=6, stability_threshold=None, confidence_threshold=None)),
    "wide_bound": ([PROMPTS[0]], 16, dict(gamma=2.0, steps=6, stability_threshold=None, confidence_threshold=None)),
    "max_steps": ([PROMPTS[1]], 16, dict(gamma=0.5, steps=2, stability_threshold=None, confidence_threshold=None)),
    "adaptive": ([PROMPTS[0]], 16, dict(gamma=1.0, steps=12, t_min=0.005, t_max=0.02, stability_threshold=2,
                                       confidence_threshold=5.0)),
    "batch3_left_padded": (PROMPTS, 24, dict(gamma=1.0, steps=12, t_min=0.0125, t_max=0.05, stability_threshold=1,
                                            confidence_threshold=5.0)),
}


@pytest.mark.parametrize("case", CASES)
def test_sampler_reproduces_generate_token_for_token(gemma, case):
    prompts, length, settings = CASES[case]
    ours, ref, ref_tokens = both(gemma, prompts, length, **settings)
    assert torch.equal(ours.tokens, ref_tokens)
    # tokens_per_forward: tokens other than PAD over the denoising passes each row ran
    torch.testing.assert_close((ours.tokens != SPECIAL.pad).sum(1) / ours.row_nfe, ref.tokens_per_forward)
    # adaptive stopping ends some canvas before its N steps (rows alike: each canvas runs N, EOS or not)
    early = ours.row_nfe % settings["steps"] != 0
    assert early.any() if settings["stability_threshold"] is not None else not early.any()


def test_traced_run_gives_the_same_tokens(gemma):
    prompts, length, settings = CASES["batch3_left_padded"]
    sampler = EntropyBoundSampler(**settings)
    plain = sampler.generate(gemma, Stub(), prompts, length, seed=3)
    with recording(sampler) as traj:
        traced = sampler.generate(gemma, Stub(), prompts, length, seed=3)
    assert torch.equal(traced.tokens, plain.tokens) and len(traj.steps) == traced.nfe
    assert traj.steps[0].renoised[:, :C].any() and not traj.steps[0].committed[:, C:].any()


def test_eos_finishes_a_row_as_generate_does(gemma):
    prompts, length, settings = CASES["batch3_left_padded"]
    plain, _, _ = both(gemma, prompts, length, **settings)
    eos = int(plain.tokens[1, 3])  # a token row 1 commits in its first canvas becomes the EOS
    special = SpecialTokens(pad=60, bos=61, eos=eos, mask=63)
    ours, ref, ref_tokens = both(gemma, prompts, length, special=special, **settings)
    assert torch.equal(ours.tokens, ref_tokens)
    first = int((plain.tokens[1] == eos).nonzero()[0])
    assert ours.lengths[1] == first and (ours.tokens[1, first + 1:] == special.pad).all()
    torch.testing.assert_close((ours.tokens != special.pad).sum(1) / ours.row_nfe, ref.tokens_per_forward)


def test_backbone_contract_and_passes(gemma):
    assert isinstance(gemma, Backbone) and isinstance(gemma, EncodesCanvas)
    ids = torch.randint(0, 60, (2, 10))
    logits = gemma.logits(gemma(ids, causal=True))
    assert logits.shape == (2, 10, V) and logits.abs().max() <= 30.0  # Gemma's soft-capping
    # the generic causal call is the encoder: a later token changes no earlier position
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 1) % 60
    torch.testing.assert_close(gemma(later, causal=True)[:, :-1], gemma(ids, causal=True)[:, :-1])
    # encode + denoise = transformers' own forward (prompt and canvas in one call)
    canvas = torch.randint(0, V, (2, C))
    cache = gemma.new_cache(0)
    mask = torch.ones(2, 10, dtype=torch.bool)
    gemma.encode(ids, mask, torch.arange(10)[None], cache)
    ours = gemma.denoise(canvas, cache, torch.ones(2, 10 + C, dtype=torch.bool), torch.arange(10, 10 + C)[None])
    ref = gemma.model(input_ids=ids, decoder_input_ids=canvas).logits
    torch.testing.assert_close(ours, ref)
    with pytest.raises(DiffuseError, match="bidirectional pass is encode"):
        gemma(ids)
    with pytest.raises(DiffuseError, match="generic call takes no cache"):  # sampler=ar's cached call, not ignored
        gemma(ids, causal=True, cache=gemma.new_cache(0))


def test_bad_construction_is_one_line(tmp_path):
    with pytest.raises(DiffuseError, match="model.path=.* is not a DiffusionGemma folder"):
        DiffusionGemma(V, path=str(tmp_path))
    with pytest.raises(DiffuseError, match="needs model.path"):
        DiffusionGemma(V)


# -- objective=diffusion_gemma ------------------------------------------------------------------------------
def recipe(**kw):
    return DiffusionGemmaRecipe(build_schedule({"name": "linear"}), SPECIAL, **kw)


def sft_batch():
    """Row 0: BOS, a 3-token prompt, a 10-token answer (two canvases: 8 + 2), padding; row 1: BOS, 2-token
    prompt, 5-token answer."""
    ids = torch.full((2, 20), SPECIAL.pad)
    ids[0, :14] = torch.tensor([SPECIAL.bos, 1, 2, 3] + list(range(10, 20)))
    ids[1, :8] = torch.tensor([SPECIAL.bos, 4, 5] + list(range(30, 35)))
    seg = (ids != SPECIAL.pad).long()
    prompt = torch.zeros_like(ids)
    prompt[0, :4], prompt[1, :3] = 1, 1
    return {"input_ids": ids, "segment_ids": seg, "prompt_mask": prompt}


def test_the_prompt_is_the_context_and_targets_are_canvas_aligned():
    batch, seen = sft_batch(), set()
    for seed in range(12):
        context, ctx_mask, target, valid = recipe().split(batch, C, torch.Generator().manual_seed(seed))
        real = context[0][ctx_mask[0]].tolist()
        seen.add(len(real))
        assert real == batch["input_ids"][0, :len(real)].tolist()  # BOS, prompt, then whole earlier canvases
        assert target[0][valid[0]].tolist() == list(range(10, 20))[len(real) - 4:][:C]
        assert context[1][ctx_mask[1]].tolist() == [SPECIAL.bos, 4, 5]  # one canvas: the prompt is all the context
        assert target[1][valid[1]].tolist() == list(range(30, 35)) and valid[1].sum() == 5
    assert seen == {4, 4 + C}  # either canvas of row 0's answer


def test_each_rank_draws_its_rows_canvas():
    """Under DDP (a sharded generator) a rank's canvas choice is its rows of the one-process draw, as every
    objective's noise is (core/noise.py batch_draw): torch.rand(B) gave each rank the first B draws."""
    from diffuse.core.noise import noise_generator

    batch = {k: v.repeat(3, 1) for k, v in sft_batch().items()}  # 6 rows
    whole = recipe().split(batch, C, noise_generator(3, 7, "cpu"))[1].sum(1)
    for rank in range(2):
        rows = {k: v[rank::2] for k, v in batch.items()}
        mine = recipe().split(rows, C, noise_generator(3, 7, "cpu", rank=rank, world_size=2))[1].sum(1)
        assert torch.equal(mine, whole[rank::2]), rank

def test_one_training_step_is_finite_and_reaches_every_weight():
    torch.manual_seed(1)
    model = DiffusionGemma(V, config=TEXT, canvas_length=C)
    out = recipe(self_conditioning=1.0).loss(model, sft_batch(), torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.n_tokens > 0 and torch.isfinite(out.nll_sum)
    assert out.metrics["ar_loss"] > 0 and out.metrics["self_conditioned"] == 1.0
    out.loss.backward()
    text = {n: p for n, p in model.named_parameters() if "vision" not in n}  # the vision tower reads no text
    assert [n for n, p in text.items() if p.grad is None or not p.grad.abs().sum() > 0] == []
    with pytest.raises(DiffuseError, match="objective=diffusion_gemma trains an encoder"):
        recipe().check_backbone(object(), "transformer")


# -- train (SFT) → export format=diffusion_gemma → transformers alone -------------------------------------------
# a fresh interpreter with transformers only: from_pretrained + generate under torch.manual_seed, as a user would
GENERATE = r"""
import sys, torch
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion
folder, out, text, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(folder)
model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder).eval()
ids = tok([text], return_tensors="pt")["input_ids"]
torch.manual_seed(seed)
result = model.generate(ids)
assert not any(m == "diffuse" or m.startswith("diffuse.") for m in sys.modules), "diffuse was imported"
torch.save({"ids": ids, "new": result.sequences[:, ids.shape[1]:], "tpf": result.tokens_per_forward}, out)
"""


def test_sft_run_exports_a_folder_transformers_generates_from_alone(tmp_path):
    rows = [{"prompt": f"Q: {i}+{i}=? A: ", "completion": f"{2 * i} is the sum of {i} and {i}."} for i in range(24)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    result = call_main("diffuse.train", "recipe=diffusion_gemma", "debug=default", "data=sft", f"data.path={data}",
                       "tokenizer=byte", "num_samples=0", "trainer.max_steps=2", "sample_length=16", "sampler.steps=4",
                       "sampler.confidence_threshold=5.0", f"hydra.run.dir={run}")
    assert result.returncode == 0, result
    ckpt = run / "checkpoints" / "last.ckpt"
    folder = export(str(ckpt), str(tmp_path / "gemma"), format="diffusion_gemma")
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["max_denoising_steps"] == 4 and gen["confidence_threshold"] == 5.0 and gen["max_new_tokens"] == 16

    prompt, seed = "Q: 3+3=? A: ", 5
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(folder), str(tmp_path / "out.pt"), prompt, str(seed)],
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**OFFLINE, "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = torch.load(tmp_path / "out.pt")

    _, tokenizer, module = load_run(str(ckpt))
    ours = module.generate([tokenizer.encode(prompt, add_special_tokens=False)], 16, seed=seed)
    assert stock["ids"][0, 0] == tokenizer.bos_token_id  # the exported tokenizer puts BOS first, as the sampler does
    new = stock["new"]
    new = torch.cat([new, new.new_full((1, 16 - new.shape[1]), tokenizer.pad_token_id)], 1)
    assert torch.equal(ours.tokens, new)
    torch.testing.assert_close((ours.tokens != tokenizer.pad_token_id).sum(1) / ours.row_nfe, stock["tpf"])

    # model.path= reads the folder back: the same network (a tokenizer larger than its vocabulary: one line)
    with pytest.raises(DiffuseError, match="do not fit model.path"):
        DiffusionGemma(len(tokenizer) + 1, path=str(folder))
    loaded = DiffusionGemma(len(tokenizer), path=str(folder)).eval()
    ids = torch.randint(0, len(tokenizer), (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(loaded(ids, causal=True)),
                                   module.backbone.logits(module.backbone(ids, causal=True)))
