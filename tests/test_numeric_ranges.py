"""Every numeric key of a registered component is checked where the component is built (at the start of a run):
a value out of range is one line naming `group.key=value` and the range (diffuse/core/checks.py), never a
multi-line torch error at fit time nor a run that trains silently wrong (`callbacks.ema.decay=1.0` kept the
initial weights for validation, best.ckpt, samples and export).

Built through the registries directly: cheap, no training. One case goes through the CLI entry point.
"""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from conftest import call_main, error_lines, tiny_args
from diffuse.core.checks import check_order, check_range
from diffuse.errors import DiffuseError
from diffuse.objectives.base import SpecialTokens
from diffuse.registry import MODELS, OBJECTIVES, SAMPLERS
from diffuse.schedules import build_schedule

SPECIAL = SpecialTokens(pad=0, bos=1, eos=2, mask=3)
VOCAB = 16


def model(name, **kw):
    return lambda: MODELS.build({"name": name, **kw}, vocab_size=VOCAB)


def objective(name, **kw):
    return lambda: OBJECTIVES.build({"name": name, **kw}, special=SPECIAL, schedule=build_schedule("linear"))


def sampler(name, **kw):
    return lambda: SAMPLERS.build({"name": name, **kw})


def ema(**kw):
    from diffuse.run.callbacks.ema import EMA

    return lambda: EMA(**kw)


CDLM_METHOD = {"name": "cdlm", "block_size": 8, "num_trajectories": 4, "gen_length": 16, "prompt_length": 0,
               "top_k": 4, "temperature": 1.0, "threshold": 0.9}


def cdlm_plan(**kw):
    """CDLM's round plan (the keys read before the teacher records its trajectories)."""
    from diffuse.distillation.cdlm import CDLM

    cfg = OmegaConf.create({"rounds": 1, "teacher": "/no/teacher.ckpt"})
    return lambda: CDLM.rounds(cfg, {**CDLM_METHOD, **kw}, {}, "/tmp/never-written")


def sdtt_plan(**kw):
    from diffuse.distillation.sdtt import SDTT

    cfg = OmegaConf.create({"rounds": 1, "steps": 8, "teacher": "/no/teacher.ckpt", **kw})
    return lambda: SDTT.rounds(cfg, {"name": "sdtt", "k": 2}, {}, "/tmp/never-written")


# (component override, the start of its one-line error). Before these checks: (T) a multi-line torch/Python
# error at build or fit time, (S) accepted: trained or sampled silently wrong or degenerate.
CASES = {
    # model=transformer
    "transformer d_model=0 (S)": (model("transformer", d_model=0), "model.d_model=0 must be an integer ≥ 1"),
    "transformer n_layers=0 (S)": (model("transformer", n_layers=0), "model.n_layers=0 must be an integer ≥ 1"),
    "transformer n_heads=0 (T)": (model("transformer", n_heads=0), "model.n_heads=0 must be an integer ≥ 1"),
    "transformer n_heads=-4 (T)": (model("transformer", n_heads=-4), "model.n_heads=-4 must be an integer ≥ 1"),
    "transformer mlp_ratio=0 (S)": (model("transformer", mlp_ratio=0.0), "model.mlp_ratio=0.0 must be a number > 0"),
    "transformer mlp_ratio<0 (T)": (model("transformer", mlp_ratio=-1.0), "model.mlp_ratio=-1.0 must be a number > 0"),
    "transformer dropout=1 (S)": (model("transformer", dropout=1.0), "model.dropout=1.0 must lie in [0, 1)"),
    "transformer dropout>1 (T)": (model("transformer", dropout=1.5), "model.dropout=1.5 must lie in [0, 1)"),
    "transformer dropout<0 (T)": (model("transformer", dropout=-0.1), "model.dropout=-0.1 must lie in [0, 1)"),
    "transformer rope_base=0 (S)": (model("transformer", rope_base=0.0), "model.rope_base=0.0 must be a number > 1"),
    "transformer rope_base<0 (S)": (model("transformer", rope_base=-1.0), "model.rope_base=-1.0 must be a number > 1"),
    # model=mamba2
    "mamba2 d_model=0 (S)": (model("mamba2", d_model=0), "model.d_model=0 must be an integer ≥ 1"),
    "mamba2 n_layers=0 (S)": (model("mamba2", n_layers=0), "model.n_layers=0 must be an integer ≥ 1"),
    "mamba2 d_state=0 (S)": (model("mamba2", d_state=0), "model.d_state=0 must be an integer ≥ 1"),
    "mamba2 expand=0 (S)": (model("mamba2", expand=0), "model.expand=0 must be an integer ≥ 1"),
    "mamba2 expand=1.5 (S)": (model("mamba2", expand=1.5), "model.expand=1.5 must be an integer ≥ 1"),
    "mamba2 headdim=0 (T)": (model("mamba2", headdim=0), "model.headdim=0 must be an integer ≥ 1"),
    "mamba2 ngroups=0 (T)": (model("mamba2", ngroups=0), "model.ngroups=0 must be an integer ≥ 1"),
    "mamba2 A_init_range low=0 (S)": (model("mamba2", A_init_range=[0.0, 16.0]),
                                      "model.A_init_range=[0.0, 16.0] must be two numbers 0 < low ≤ high"),
    "mamba2 A_init_range reversed (T)": (model("mamba2", A_init_range=[16.0, 1.0]),
                                         "model.A_init_range=[16.0, 1.0] must be two numbers 0 < low ≤ high"),
    "mamba2 dt_min=0 (T)": (model("mamba2", dt_min=0.0), "model.dt_min=0.0 must be a number > 0"),
    "mamba2 dt_max<0 (T)": (model("mamba2", dt_max=-0.1), "model.dt_max=-0.1 must be a number > 0"),
    "mamba2 dt_min>dt_max (S)": (model("mamba2", dt_min=0.5, dt_max=0.1), "model.dt_min=0.5 must be ≤ model.dt_max=0.1"),
    "mamba2 dt_init_floor<0 (S)": (model("mamba2", dt_init_floor=-1.0),
                                   "model.dt_init_floor=-1.0 must be a number ≥ 0"),
    # model=hf (d_model / n_layers override the config's hidden_size / num_hidden_layers)
    "hf d_model=0 (S)": (model("hf", d_model=0), "model.d_model=0 must be an integer ≥ 1"),
    "hf n_layers=0 (S)": (model("hf", n_layers=0), "model.n_layers=0 must be an integer ≥ 1"),
    # objective=llada
    "llada mask_token_id=-1 (T)": (objective("llada", mask_token_id=-1),
                                   "objective.mask_token_id=-1 must be an integer ≥ 0"),
    # samplers: eps ends the time grid 1 → eps (eps ≥ 1 decodes everything on the last step)
    "ancestral eps=1 (S)": (sampler("ancestral", eps=1.0), "sampler.eps=1.0 must lie in [0, 1)"),
    "ancestral eps<0 (S)": (sampler("ancestral", eps=-0.5), "sampler.eps=-0.5 must lie in [0, 1)"),
    "remask eps>1 (S)": (sampler("remask", eps=2.0), "sampler.eps=2.0 must lie in [0, 1)"),
    "llada eps=1 (S)": (sampler("llada", eps=1.0), "sampler.eps=1.0 must lie in [0, 1)"),
    "threshold eps=1 (S)": (sampler("threshold", eps=1.0), "sampler.eps=1.0 must lie in [0, 1)"),
    "block eps=1 (S)": (sampler("block", eps=1.0), "sampler.eps=1.0 must lie in [0, 1)"),
    "remask confidence_threshold=0 (S)": (sampler("remask", confidence_threshold=0.0),
                                          "sampler.confidence_threshold=0.0 must lie in (0, 1]"),
    "remask confidence_threshold>1 (S)": (sampler("remask", confidence_threshold=1.5),
                                          "sampler.confidence_threshold=1.5 must lie in (0, 1]"),
    # callbacks=ema
    "ema decay=1 (S)": (ema(decay=1.0), "callbacks.ema.decay=1.0 must lie in [0, 1)"),
    "ema decay>1 (T)": (ema(decay=1.5), "callbacks.ema.decay=1.5 must lie in [0, 1)"),
    "ema decay<0 (T)": (ema(decay=-0.1), "callbacks.ema.decay=-0.1 must lie in [0, 1)"),
    "ema update_every_n_steps=0 (S)": (ema(update_every_n_steps=0),
                                       "callbacks.ema.update_every_n_steps=0 must be an integer ≥ 1"),
    "ema update_every_n_steps<0 (S)": (ema(update_every_n_steps=-2),
                                       "callbacks.ema.update_every_n_steps=-2 must be an integer ≥ 1"),
    "ema update_starting_at_step<0 (S)": (ema(update_starting_at_step=-1),
                                          "callbacks.ema.update_starting_at_step=-1 must be an integer ≥ 0"),
    # method=cdlm: the round plan, before the teacher records (block_size=0: ZeroDivisionError while recording)
    "cdlm block_size=0 (T)": (cdlm_plan(block_size=0), "method.block_size=0 must be an integer ≥ 1"),
    "cdlm num_trajectories=0 (T)": (cdlm_plan(num_trajectories=0), "method.num_trajectories=0 must be an integer ≥ 1"),
    "cdlm gen_length=0 (T)": (cdlm_plan(gen_length=0), "method.gen_length=0 must be an integer ≥ 1"),
    "cdlm prompt_length<0 (S)": (cdlm_plan(prompt_length=-1), "method.prompt_length=-1 must be an integer ≥ 0"),
    "cdlm top_k=0 (S)": (cdlm_plan(top_k=0), "method.top_k=0 must be an integer ≥ 1"),
    "cdlm temperature<0 (S)": (cdlm_plan(temperature=-1.0), "method.temperature=-1.0 must be a number ≥ 0"),
    "cdlm threshold=0 (S)": (cdlm_plan(threshold=0.0), "method.threshold=0.0 must lie in (0, 1]"),
    # method=sdtt: the teacher's steps (0 was refused later, as method.student_steps=0)
    "sdtt steps=0": (sdtt_plan(steps=0), "steps=0 must be an integer ≥ 1"),
}


@pytest.mark.parametrize("case", CASES)
def test_out_of_range_is_one_line_naming_the_key(case):
    build, expected = CASES[case]
    with pytest.raises(DiffuseError) as info:
        build()
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


# the edges of each range (and null where it is allowed) are accepted
VALID = {
    "transformer dropout=0": model("transformer", d_model=16, n_layers=1, n_heads=2, dropout=0.0),
    "transformer rope_base=1.5": model("transformer", d_model=16, n_layers=1, n_heads=2, rope_base=1.5),
    "mamba2 equal ranges": model("mamba2", d_model=16, n_layers=1, d_state=4, headdim=8, chunk_size=4, dt_min=0.01,
                                 dt_max=0.01, A_init_range=[2.0, 2.0], dt_init_floor=0.0),
    "llada mask_token_id=0": objective("llada", mask_token_id=0),
    "ancestral eps=0": sampler("ancestral", eps=0.0),
    "block eps=0": sampler("block", eps=0.0),
    "remask confidence_threshold=1": sampler("remask", confidence_threshold=1.0),
    "remask confidence_threshold=null": sampler("remask", confidence_threshold=None),
    "ema decay=0": ema(decay=0.0, update_starting_at_step=0),
    "ema decay=0.9999": ema(decay=0.9999, update_every_n_steps=3, update_starting_at_step=None),
    "cdlm prompt_length=0, temperature=0, threshold=null": cdlm_plan(prompt_length=0, temperature=0.0, threshold=None),
    "cdlm threshold=1": cdlm_plan(threshold=1.0),
}


@pytest.mark.parametrize("case", VALID)
def test_range_edges_are_accepted(case):
    VALID[case]()


def test_python_defaults_are_in_range():
    """Every sampler and the EMA build from their Python defaults (the yamls equal them: tests/test_defaults.py)."""
    for name in SAMPLERS.names():
        SAMPLERS.build({"name": name})
    ema()()


@pytest.mark.parametrize("value", [True, "0.5", math.nan, None])
def test_not_a_number_is_out_of_every_range(value):
    with pytest.raises(DiffuseError, match=r"^group\.key=.* must lie in \[0, 1\)$"):
        check_range("group.key", value, 0, 1, high_open=True)


def test_check_helpers():
    assert check_range("g.k", 3, 1, integer=True) == 3
    assert check_range("g.k", None, 1, integer=True, null="off") is None
    with pytest.raises(DiffuseError, match=r"^g\.k=2\.0 must be an integer ≥ 1$"):
        check_range("g.k", 2.0, 1, integer=True)
    with pytest.raises(DiffuseError, match=r"^g\.k=0 must be an integer in \[1, 4\] \(or null: off\)$"):
        check_range("g.k", 0, 1, 4, integer=True, null="off")
    with pytest.raises(DiffuseError, match=r"^g\.lo=3 must be ≤ g\.hi=2$"):
        check_order("g.lo", 3, "g.hi", 2)


def test_ema_decay_one_through_the_cli(corpus, tmp_path):
    """`callbacks=ema callbacks.ema.decay=1.0` trained with an EMA frozen at the initial weights: now refused
    before the first step, in one line, exit code 2."""
    run = tmp_path / "run"
    result = call_main("diffuse.train", *tiny_args(corpus, run, "callbacks=ema", "callbacks.ema.decay=1.0"))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert lines == ["error: callbacks.ema.decay=1.0 must lie in [0, 1)"], result.stderr[-3000:]
    assert not (run / "checkpoints").exists()
