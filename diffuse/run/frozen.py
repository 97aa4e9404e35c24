"""A network an objective or regularizer uses but never trains (a distillation teacher, a judge).

`Frozen(net, source)` moves with its owner (`.to`, `.cuda`, `.half`: every `nn.Module._apply`), stays in
eval mode when the owner trains, gives no parameters to the optimizer, and keeps its weights out of the
owner's state_dict: a checkpoint records only where the weights came from (`…_extra_state = {"source":
…}`), so a student's checkpoint is not doubled by its teacher. Trainable state of an objective (an EMA
target, a learned schedule) is an ordinary submodule or buffer instead, and is checkpointed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffuse.run.load import load_run


class Frozen(nn.Module):
    def __init__(self, net: nn.Module, source: str):
        super().__init__()
        net.requires_grad_(False).eval()
        # set past nn.Module.__setattr__: not a registered child, so not in state_dict() or parameters()
        object.__setattr__(self, "net", net)
        self.source = str(source)

    @classmethod
    def from_checkpoint(cls, ckpt_path: str, map_location="cpu") -> Frozen:
        """The backbone of a diffuse checkpoint, frozen, remembering its path."""
        _, _, module = load_run(ckpt_path, map_location)
        return cls(module.backbone, ckpt_path)

    def _apply(self, fn, recurse: bool = True):
        self.net._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> Frozen:
        self.training = mode  # the wrapped net stays in eval mode: no dropout in a teacher
        return self

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.net(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # the wrapped net's API (embed, logits, vocab_size, …) is the teacher's
            return getattr(self.__dict__["net"], name)

    def get_extra_state(self) -> dict:
        return {"source": self.source}

    def set_extra_state(self, state: dict) -> None:
        self.saved_source = state.get("source")  # where the checkpoint's teacher came from
