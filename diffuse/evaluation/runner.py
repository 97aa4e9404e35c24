"""Evaluate one checkpoint end to end: its likelihood on held-out data, a steps-vs-quality sweep of
its samples, and the reference line of real text. Shared by `diffuse.evaluate` and `diffuse.compare`."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

from omegaconf import OmegaConf

from diffuse.contracts import is_autoregressive
from diffuse.errors import DiffuseError
from diffuse.evaluation.likelihood import evaluate_likelihood
from diffuse.evaluation.quality import degenerate, real_snippets, reference
from diffuse.evaluation.sweep import sweep
from diffuse.registry import SAMPLERS
from diffuse.run.build import DATAMODULE_KEYS, as_dict, build_datamodule
from diffuse.run.entry import check_context, sampler_spec
from diffuse.run.load import load_run


@dataclass
class Checkpoint:
    path: str
    cfg: object  # the training config stored in the checkpoint
    tokenizer: object
    module: object

    @property
    def objective(self) -> str:
        return self.module.objective.registry_name

    @property
    def autoregressive(self) -> bool:
        return is_autoregressive(self.module.objective)


def load_checkpoint(path: str, device, key: str = "ckpt") -> Checkpoint:
    cfg, tokenizer, module = load_run(str(path), key=key)
    return Checkpoint(str(path), cfg, tokenizer, module.to(device))


def eval_data_config(train_data: dict, data: dict | None, overridden: set[str] = frozenset()) -> dict:
    """The checkpoint's own data config, or the `data=` group given, whose DataModule keys (seq_len,
    batch sizes, BOS/EOS, packing) follow the checkpoint unless set on the command line: the model
    is evaluated on the context it was trained for.

    A file (or folder) given as `data.path` is evaluated whole: it becomes the validation split
    (`val_path`), not the seeded val_fraction of it that training would hold out, and it is read in full
    rather than streamed. `data.val_path` or `data.val_fraction` given as well keep their training meaning."""
    if not data:
        return dict(train_data)
    out = dict(data)
    for key in DATAMODULE_KEYS:
        if key in train_data and key not in overridden:
            out[key] = train_data[key]
    named = out.get("path") is not None and "val_path" in out and out["val_path"] is None
    if named and "val_fraction" not in overridden:
        out["val_path"] = out["path"]
        if "streaming" not in overridden:
            out["streaming"] = False  # a stream's validation is its first data.stream_val_docs documents only
    return out


def heldout(ckpt: Checkpoint, data_cfg: dict, seed: int, cache_dir: str):
    """A DataModule over the validation split only, tokenized with the checkpoint's tokenizer."""
    spec = OmegaConf.create({"data": data_cfg, "tokenizer": as_dict(ckpt.cfg.tokenizer)})
    dm = build_datamodule(spec, seed=seed, cache_dir=cache_dir)
    dm.load(ckpt.tokenizer)
    dm.split_names = ("validation",)  # the training split is neither tokenized nor read
    dm.setup("validate")
    return dm


def step_list(settings, spec: dict) -> list[int]:
    """`steps=[8,16,…]` sweeps, `steps=32` is one step count, null: the sampler's own."""
    steps = settings.get("steps")
    if steps is None:
        return [int(spec.get("steps") or 64)]
    steps = [steps] if isinstance(steps, int) else list(steps)
    if not steps or any(not isinstance(s, int) or s <= 0 for s in steps):
        raise DiffuseError(f"steps={steps} must be a positive integer or a list of them")
    return sorted(set(steps))


def check_settings(settings) -> None:
    for key, low in (("t_samples", 1), ("num_samples", 0), ("length", 1), ("batch_size", 1), ("reference_samples", 0)):
        value = settings.get(key)
        if not isinstance(value, int) or value < low:
            raise DiffuseError(f"{key}={value} must be an integer ≥ {low}")
    limit = settings.get("limit_batches")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DiffuseError(f"limit_batches={limit} must be a positive integer (or null: every batch)")


def evaluate_checkpoint(ckpt: Checkpoint, settings, data_cfg: dict, judge, cache_dir: str, track=None) -> dict:
    """Everything `diffuse.evaluate` reports for one checkpoint, as one JSON-able dict."""
    check_settings(settings)
    seed = int(settings.seed if settings.get("seed") is not None else ckpt.cfg.get("seed", 0))
    result = {"ckpt": ckpt.path, "objective": ckpt.objective, "seed": seed, "data": data_cfg,
              "judge": getattr(judge, "name", None), "notes": []}
    dm = heldout(ckpt, data_cfg, seed, cache_dir)
    val = dm.splits["validation"]
    result["data_description"] = f"{len(val)} held-out rows of {dm.seq_len} tokens, vocab {len(ckpt.tokenizer)}"

    if settings.get("likelihood", True):
        limit = settings.get("limit_batches")
        loader = dm.val_dataloader()
        total = len(loader) if limit is None else min(int(limit), len(loader))
        result["likelihood"] = evaluate_likelihood(ckpt.module, islice(loader, total), settings.t_samples,
                                                   seed, track=track, total=total)

    if int(settings.num_samples) > 0:
        spec = sampler_spec(settings, ckpt.cfg, ckpt.module.objective, shorthands=("temperature",))
        check_context(ckpt.cfg, [[]], int(settings.length), bool(settings.get("beyond_context", False)),
                      SAMPLERS.get(spec["name"]))
        if judge is None:
            result["notes"].append("gen-PPL skipped: no judge (give judge=PATH to an autoregressive diffuse "
                                   "checkpoint, or judge=hf judge_model=…)")
        points, samples = sweep(ckpt.module, spec, step_list(settings, spec), ckpt.tokenizer, judge,
                                int(settings.num_samples), int(settings.length), int(settings.batch_size), seed,
                                track=track)
        texts, tokens = real_snippets(dm.documents("validation"), ckpt.tokenizer,
                                      int(settings.reference_samples), int(settings.length))
        ref = reference(texts, tokens, judge) if texts else None
        if ref is None:
            result["notes"].append(f"no reference line: the held-out text has no {settings.length}-token piece")
        for point in points:
            point["degenerate"] = degenerate(point, ref)
        result.update({"sweep": points, "quality": points[-1], "reference": ref,
                       "samples": [{"text": t, "length": len(k)} for t, k in zip(samples.texts, samples.tokens)]})
        if any(p["degenerate"] for p in points):
            result["notes"].append("degenerate: some samples score better than real text at lower entropy "
                                   "(repetitive, not better)")
    return result
