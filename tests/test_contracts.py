"""The written contracts (diffuse/contracts.py): every built-in meets its Protocol, samplers and objectives
are matched by process (a mismatch fails at start in one line), objectives and regularizers are modules
that may own networks, and the optimizer comes from `optim._target_`."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from conftest import SPECIAL, call_main, error_lines, tiny_args, tiny_transformer
from diffuse.run.build import build_regularizers, build_sampler
from diffuse.contracts import (Backbone, DataSource, NoisingObjective, Objective, Regularizer, Sampler,
                               TokenizerBuilder, check_contract, has_noise_process)
from diffuse.errors import DiffuseError
from diffuse.run.frozen import Frozen
from diffuse.run.module import DiffusionLM
from diffuse.registry import DATASETS, OBJECTIVES, REGULARIZERS, SAMPLERS, TOKENIZERS
from diffuse.schedules import build_schedule
from test_config import compose_train


def objective(name: str, **kw):
    return OBJECTIVES.build({"name": name, **kw}, schedule=build_schedule("linear"), special=SPECIAL)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_objective_meets_the_contract_and_is_a_module(name):
    obj = objective(name)
    check_contract(obj, Objective, name)
    assert isinstance(obj, nn.Module)
    assert obj.default_sampler in SAMPLERS and obj.process in SAMPLERS.get(obj.default_sampler).processes
    if has_noise_process(obj):
        check_contract(obj, NoisingObjective, name)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_declares_the_processes_it_decodes(name):
    cls = SAMPLERS.get(name)
    check_contract(cls, Sampler, name)
    assert cls.processes and all(isinstance(p, str) for p in cls.processes)


def test_backbones_and_regularizers_meet_their_contracts():
    check_contract(tiny_transformer(), Backbone, "transformer")
    for name in REGULARIZERS.names():
        reg = REGULARIZERS.build({"name": name})
        check_contract(reg, Regularizer, name)
        assert isinstance(reg, nn.Module)


def test_data_sources_and_tokenizers_meet_their_contracts():
    for name in DATASETS.names():
        check_contract(DATASETS.get(name), DataSource, name)
    for name in TOKENIZERS.names():
        check_contract(TOKENIZERS.get(name), TokenizerBuilder, name)


def test_a_component_missing_part_of_its_contract_is_named_at_build_time():
    class NoProcess:
        causal, default_sampler, special = False, "ar", SPECIAL

        def loss(self, backbone, batch, generator=None, train=True): ...

    with pytest.raises(DiffuseError, match=r"objective=x \(NoProcess\) does not meet the Objective contract.*missing process"):
        check_contract(NoProcess(), Objective, "objective=x")


@pytest.mark.parametrize("name,expected", [("masked_discrete", "ancestral"), ("llada", "llada"),
                                           ("autoregressive", "ar"), ("continuous", "ddim")])
def test_the_sampler_defaults_to_the_objectives_own(name, expected):
    obj = objective(name)
    assert build_sampler({}, obj).registry_name == expected
    assert build_sampler(None, obj).registry_name == expected


def test_the_default_preset_names_no_sampler_and_samples_with_the_objectives_own():
    assert dict(compose_train([]).sampler) == {}
    assert dict(compose_train(["objective=llada"]).sampler) == {}
    assert compose_train(["sampler=threshold"]).sampler.name == "threshold"


@pytest.mark.parametrize("sampler,name", [("remask", "autoregressive"), ("ddim", "masked_discrete"),
                                          ("ar", "llada"), ("ancestral", "continuous")])
def test_a_sampler_of_another_process_is_refused_not_replaced(sampler, name):
    with pytest.raises(DiffuseError) as err:
        build_sampler({"name": sampler}, objective(name))
    message = str(err.value)
    assert "\n" not in message and f"sampler={sampler}" in message and f"objective={name}" in message
    assert f"sampler={objective(name).default_sampler}" in message  # says what would fit


def test_a_mismatched_pair_fails_at_the_start_of_training_in_one_line(corpus, tmp_path):
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path, "objective=autoregressive", "sampler=remask"))
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "sampler=remask" in lines[0] and "autoregressive" in lines[0], result
    assert not (tmp_path / "checkpoints").exists()  # refused before a single step


def test_a_mismatched_sampler_for_a_checkpoint_fails_in_one_line(debug_run):
    result = call_main("diffuse.sample", f"ckpt={debug_run / 'checkpoints' / 'last.ckpt'}", "sampler=ddim",
                       f"hydra.run.dir={debug_run / 'sample_mismatch'}")
    lines = error_lines(result.stderr)
    assert result.returncode != 0 and len(lines) == 1 and "sampler=ddim" in lines[0], result


def test_several_regularizers_at_once():
    cfg = compose_train(["regularizer=cdlm_consistency", "+regularizers=[{name: cdlm_consistency, weight: 0.1}]"])
    regs = build_regularizers(cfg)
    assert [r.weight for r in regs] == [0.5, 0.1]
    module = DiffusionLM(tiny_transformer(), objective("masked_discrete"), regs)
    assert len(module.regularizers) == 2 and isinstance(module.regularizers, nn.ModuleList)


# -- objectives own networks: a frozen teacher and a trained buffer --------------------------------------
class TeacherObjective(nn.Module):
    """An objective holding a frozen teacher (not checkpointed) and an EMA buffer (checkpointed)."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.base = objective("masked_discrete")
        self.process, self.causal, self.default_sampler = self.base.process, False, "remask"
        self.special = SPECIAL
        self.teacher = Frozen(teacher, "teacher.ckpt")
        self.register_buffer("ema_loss", torch.zeros(()))
        self.seen_steps: list[int] = []

    def loss(self, backbone, batch, generator=None, train=True):
        out = self.base.loss(backbone, batch, generator, train)
        self.seen_steps.append(self.global_step)
        with torch.no_grad():
            self.ema_loss.mul_(0.9).add_(0.1 * out.loss.detach())
        return out


def test_a_frozen_teacher_moves_with_its_owner_but_stays_out_of_the_checkpoint(tmp_path):
    teacher = tiny_transformer(seed=1).train()
    module = DiffusionLM(tiny_transformer(), TeacherObjective(teacher))
    state = module.state_dict()
    assert not [k for k in state if k.startswith("objective.teacher.") and not k.endswith("_extra_state")]
    assert state["objective.teacher._extra_state"] == {"source": "teacher.ckpt"}
    assert "objective.ema_loss" in state
    trained = {id(p) for p in module.parameters()}
    assert not any(id(p) in trained for p in teacher.parameters())  # the optimizer never sees the teacher
    module.train()
    assert module.objective.teacher.training and not teacher.training  # the teacher stays in eval mode
    module.double()
    assert next(teacher.parameters()).dtype == torch.float64 and module.objective.ema_loss.dtype == torch.float64
    torch.save(state, tmp_path / "state.pt")
    back = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = DiffusionLM(tiny_transformer(), TeacherObjective(tiny_transformer(seed=2)))
    fresh.load_state_dict(back)
    assert fresh.objective.teacher.saved_source == "teacher.ckpt"


def test_objectives_and_regularizers_receive_the_global_step():
    ids = torch.randint(0, 36, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = SPECIAL.bos
    batches = [{"input_ids": ids, "segment_ids": torch.ones_like(ids)}] * 3
    obj = TeacherObjective(tiny_transformer(seed=1))

    class StepRegularizer(nn.Module):
        def forward(self, objective, backbone, batch, generator=None):
            return torch.zeros(()), {"step_seen": torch.tensor(float(self.global_step))}

    reg = StepRegularizer()
    module = DiffusionLM(tiny_transformer(), obj, [reg], optim={"lr": 1e-3, "total_steps": 3})
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert obj.seen_steps == [0, 1, 2] and reg.global_step == 2
    assert float(obj.ema_loss) > 0


def test_the_optimizer_comes_from_its_target():
    def optimizer(optim):
        return DiffusionLM(tiny_transformer(), objective("masked_discrete"), optim=optim).configure_optimizers()["optimizer"]

    sgd = optimizer({"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "warmup_steps": 5})
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.01, 0.0]  # norms and embeddings take no decay
    cfg = compose_train([])
    adamw = optimizer(dict(cfg.optim))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["lr"] == cfg.optim.lr
    assert adamw.defaults["betas"] == (0.9, 0.98)
    with pytest.raises(Exception, match="no_such_optimizer"):
        optimizer({"_target_": "torch.optim.no_such_optimizer", "lr": 0.1})


def test_a_teacher_loads_frozen_from_a_diffuse_checkpoint(debug_run):
    path = str(debug_run / "checkpoints" / "last.ckpt")
    teacher = Frozen.from_checkpoint(path)
    assert teacher.source == path and teacher.get_extra_state() == {"source": path}
    assert not list(teacher.parameters()) and not teacher.state_dict().keys() - {"_extra_state"}
    ids = torch.full((1, 8), 5)
    hidden = teacher(ids=ids)
    assert not hidden.requires_grad and teacher.logits(hidden).shape[-1] == teacher.vocab_size
