"""Any diffuse checkpoint as an lm-evaluation-harness model, registered as `diffuse` (lm-eval 0.4.x).

    import diffuse.evaluation.lm_eval_model          # registers the name
    lm_eval.simple_evaluate(model="diffuse", model_args="ckpt=PATH,mc_samples=128", tasks=[...])

(`python -m diffuse.lm_eval ckpt=… tasks=…` does this and writes the results into a run directory. lm-eval's own
`lm_eval` command reads models from its built-in table only, not from entry points: it cannot load this class.)

- `loglikelihood`: diffuse/evaluation/continuations.py (exact for autoregressive processes, LLaDA's Monte-Carlo
  estimator for absorbing ones). Text is tokenized as lm-eval's `hf` model does (TemplateLM: trailing spaces of the
  context move to the continuation, the pair is encoded whole and split), and every row starts with BOS, as
  training's rows do. A context too long for the trained `data.seq_len` loses its oldest tokens.
- `loglikelihood_rolling`: the bound `diffuse.evaluate` reports, by the same code (evaluation/likelihood.py): the
  text in windows of seq_len − 1 tokens, each after BOS, `t_samples` noise draws (exact NLL for AR models).
- `generate_until`: the checkpoint's own sampler (or the one given), batched, seeded per request (row i of a batch
  with seed s is the sample drawn alone with seed s + i), `max_gen_toks` tokens at most (fewer where the trained
  context has no room), cut at EOS and then at the first `until` string. The task's temperature (0 when
  `do_sample` is false) is used unless a temperature was given.
Every such choice is in `choices`, which diffuse.lm_eval writes beside the scores.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  lm-eval's own models first: get_model fills its table only while it is empty
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from diffuse.errors import DiffuseError
from diffuse.evaluation.continuations import check_estimator_args, padded, scorer_for
from diffuse.evaluation.likelihood import evaluate_likelihood
from diffuse.evaluation.runner import load_checkpoint
from diffuse.registry import SAMPLERS, accepts_keyword
from diffuse.run.build import build_sampler
from diffuse.run.entry import pick_device, sampler_spec


@register_model("diffuse")
class DiffuseLM(TemplateLM):
    def __init__(self, ckpt: str, batch_size: int | str = 16, mc_samples: int = 128, seed: int = 0,
                 cfg_scale: float = 0.0, t_samples: int = 4, sampler: str | dict | None = None,
                 steps: int | None = None, temperature: float | None = None, device: str | None = "auto",
                 max_batch_size: int | None = None, **knobs):
        super().__init__()
        unknown = [k for k in knobs if not k.startswith("sampler.")]
        if unknown:
            raise DiffuseError(f"model_args key {unknown[0]} is unknown: give ckpt, batch_size, mc_samples, seed, "
                               "cfg_scale, t_samples, sampler, steps, temperature, device or sampler.<knob>")
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise DiffuseError(f"batch_size={batch_size} must be a positive integer (no 'auto' here)")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise DiffuseError(f"batch_size={batch_size} must be a positive integer")
        check_estimator_args(mc_samples, cfg_scale)
        if isinstance(t_samples, bool) or not isinstance(t_samples, int) or t_samples < 1:
            raise DiffuseError(f"t_samples={t_samples} must be a positive integer")
        checkpoint = load_checkpoint(ckpt, pick_device(device or "auto"))
        self.checkpoint, self.tokenizer, self.module = checkpoint, checkpoint.tokenizer, checkpoint.module
        self.special = self.module.objective.special
        self.seed, self.t_samples = int(seed), int(t_samples)
        self.scorer = None  # built on the first loglikelihood request: a model without an estimator still generates
        self._scorer_args = {"batch_size": self.batch_size, "mc_samples": mc_samples, "seed": self.seed,
                             "cfg_scale": cfg_scale}
        given = {"name": sampler} if isinstance(sampler, str) else dict(sampler or {})
        given.update({k.removeprefix("sampler."): v for k, v in knobs.items()})
        self.sampler_spec = sampler_spec({"sampler": given, "steps": steps, "temperature": temperature},
                                         checkpoint.cfg, self.module.objective)
        self.fixed_temperature = "temperature" in given or temperature is not None
        self._samplers: dict = {}
        self.truncated = 0
        self.choices = {"ckpt": str(ckpt), "objective": checkpoint.objective, "seq_len": self.max_length,
                        "batch_size": self.batch_size,
                        "loglikelihood_rolling": {"estimator": "diffuse.evaluate's bound (exact NLL when "
                                                  "autoregressive)", "t_samples": self.t_samples, "seed": self.seed,
                                                  "windows": "seq_len - 1 tokens after BOS, no carried context"},
                        "generate_until": {"temperature": "given" if self.fixed_temperature else "the task's",
                                           "seed": f"{self.seed} + the request's index"}}

    # -- what TemplateLM asks ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.special.bos

    @property
    def max_length(self) -> int:
        return int((self.checkpoint.cfg.get("data") or {}).get("seq_len") or 1024)

    @property
    def tokenizer_name(self) -> str:
        return str(self.checkpoint.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False)["input_ids"]  # BOS is added to every row here

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- loglikelihood ---------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        if self.scorer is None:
            self.scorer = scorer_for(self.module, **self._scorer_args)
        self.choices.setdefault("loglikelihood", {**self.scorer.describe(), "tokenization": "lm-eval's hf rule, BOS "
                                                  "first, context left-truncated to fit seq_len"})
        pairs = [self._fit(list(context), list(continuation)) for _, context, continuation in requests]
        live = [i for i, (_, continuation) in enumerate(pairs) if continuation]
        scores = self.scorer.score([pairs[i] for i in live])
        out = [(0.0, True)] * len(pairs)  # an empty continuation: log 1
        self.stderrs = [0.0] * len(pairs)
        for i, s in zip(live, scores):
            out[i] = (s.logprob, s.greedy)
            self.stderrs[i] = s.stderr
        if self.stderrs:
            self.choices["loglikelihood"]["mean_mc_stderr"] = sum(self.stderrs) / len(self.stderrs)
        self.choices["loglikelihood"]["contexts_truncated"] = self.truncated
        for (request, _, _), value in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", request, value)
        return out

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """[BOS] + context (left-truncated to fit the trained context) and the continuation."""
        if context[:1] == [self.special.bos]:
            context = context[1:]
        room = self.max_length - 1 - len(continuation)
        if room < 0:
            raise DiffuseError(f"a continuation of {len(continuation)} tokens does not fit the checkpoint's trained "
                               f"context (data.seq_len={self.max_length} with BOS); use a task with shorter answers")
        if len(context) > room:
            self.truncated += 1
            context = context[len(context) - room:]
        return [self.special.bos] + context, continuation

    # -- loglikelihood_rolling --------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        device = next(self.module.parameters()).device
        width = self.max_length - 1
        out = []
        for request in requests:
            tokens = self.tok_encode(request.args[0])
            windows = [[self.special.bos] + tokens[i : i + width] for i in range(0, max(len(tokens), 1), width)]
            ids, seg = padded(windows, self.special.pad, device)
            values = evaluate_likelihood(self.module, [{"input_ids": ids, "segment_ids": seg}], self.t_samples, self.seed)
            out.append(-values["val/nelbo"] * values["val/tokens"])
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, out[-1])
        return out

    # -- generate_until ---------------------------------------------------------------------------------
    def _sampler(self, gen_kwargs: dict):
        spec = dict(self.sampler_spec)
        task_sets = "temperature" in gen_kwargs or gen_kwargs.get("do_sample") is False
        if task_sets and not self.fixed_temperature and accepts_keyword(SAMPLERS.get(spec["name"]), "temperature"):
            spec["temperature"] = 0.0 if not gen_kwargs.get("do_sample", True) else float(gen_kwargs["temperature"])
        key = repr(sorted((k, repr(v)) for k, v in spec.items()))
        if key not in self._samplers:
            self._samplers[key] = build_sampler(spec, self.module.objective)
            self.choices["generate_until"].setdefault("samplers_used", []).append(
                {k: str(v) if k == "drafter" else v for k, v in spec.items()})
        return self._samplers[key]

    def _gen_plan(self, context: str, max_gen_toks: int, any_length: bool) -> tuple[list[int], int]:
        """The prompt tokens (left-truncated) and the number of tokens to generate, from the request alone."""
        tokens = self.tok_encode(context)
        if any_length:
            return tokens, max_gen_toks
        least = min(max_gen_toks, (self.max_length - 1) // 2)  # a long context leaves this much room at least
        tokens = tokens[max(0, len(tokens) - (self.max_length - 1 - least)):]
        return tokens, min(max_gen_toks, self.max_length - 1 - len(tokens))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        plans = []
        for q, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampler = self._sampler(gen_kwargs)
            prompt, length = self._gen_plan(context, int(gen_kwargs.get("max_gen_toks", 256)), sampler.any_length)
            plans.append((q, sampler, prompt, length, until))
        # consecutive requests with the same sampler and length share a batch (seed + index keeps each row its own)
        start = 0
        while start < len(plans):
            end = start + 1
            while (end < len(plans) and end - start < self.batch_size and plans[end][1] is plans[start][1]
                   and plans[end][3] == plans[start][3]):
                end += 1
            group = plans[start:end]
            with torch.no_grad():
                result = self.module.generate([p[2] for p in group], group[0][3], seed=self.seed + start,
                                              sampler=group[0][1])
            for (q, _, _, _, until), row, n in zip(group, result.tokens.tolist(), result.lengths.tolist()):
                text = self.tok_decode(row[:n])
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                out[q] = text
                self.cache_hook.add_partial("generate_until", requests[q].args, text)
            start = end
        self.choices["generate_until"]["lengths"] = sorted({p[3] for p in plans})
        return out
