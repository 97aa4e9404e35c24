"""Name → class registries: one mechanism for every family (models, objectives, ...).

A config names its component (`name: llada`) plus keyword arguments; `build` looks the name up and
calls the class. Unknown names and unknown keywords fail at start with what would have been valid.

This module is a leaf: it imports no family. The first lookup in any registry asks
`diffuse.core.discovery` to import every built-in component module and every installed plugin once
(see there); registering never triggers discovery, so a component module may import this freely.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from diffuse.errors import DiffuseError

_discovered = False


def _discover_once() -> None:
    global _discovered
    if not _discovered:
        _discovered = True  # before walking: a module that looks something up while loading must not recurse
        importlib.import_module("diffuse.core.discovery").discover()


def accepted_keywords(obj: Callable[..., Any]) -> list[str] | None:
    """The keyword arguments `obj` (a class or function) takes, in order; None when it takes any (**kwargs)."""
    params = inspect.signature(obj).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return [p for p in params if p != "self"]


def accepts_keyword(obj: Callable[..., Any], name: str) -> bool:
    accepted = accepted_keywords(obj)
    return accepted is None or name in accepted


class Registry:
    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable:
        def decorator(obj):
            if name in self._entries and self._entries[name] is not obj:
                raise RuntimeError(f"{self.family} '{name}' is registered twice")
            self._entries[name] = obj
            obj.registry_name = name
            return obj

        return decorator

    def names(self) -> list[str]:
        _discover_once()
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., Any]:
        _discover_once()
        if name not in self._entries:
            raise DiffuseError(
                f"unknown {self.family} '{name}'; registered: {', '.join(self.names())}"
            )
        return self._entries[name]

    def build(self, spec: Mapping[str, Any], **extra: Any) -> Any:
        """Build from a config mapping `{name: ..., **kwargs}`; `extra` are runtime arguments."""
        spec = dict(spec)
        name = spec.pop("name", None)
        if name is None:
            raise DiffuseError(f"{self.family} config has no 'name'; registered: {', '.join(self.names())}")
        cls = self.get(name)
        kwargs = {**spec, **extra}
        accepted = accepted_keywords(cls)
        unknown = [] if accepted is None else sorted(set(kwargs) - set(accepted))
        if unknown:
            raise DiffuseError(
                f"{self.family} '{name}' got unknown key(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
            )
        return cls(**kwargs)

    def __contains__(self, name: str) -> bool:
        _discover_once()
        return name in self._entries


MODELS = Registry("model")
OBJECTIVES = Registry("objective")
REGULARIZERS = Registry("regularizer")
SCHEDULES = Registry("schedule")
SAMPLERS = Registry("sampler")
TOKENIZERS = Registry("tokenizer")
DATASETS = Registry("data")
DISTILLERS = Registry("distill method")

