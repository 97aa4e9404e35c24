"""Judges score text with an autoregressive model: Σ −log p(token | earlier tokens) in nats per text.

Text is decoded from the generating model's tokenizer and re-encoded with the judge's, so any judge
can score any model. Two kinds:
- `DiffuseJudge`: an autoregressive checkpoint trained by diffuse (`judge=PATH`), scored through its
  own objective's loss (the exact NLL; nothing re-derived here);
- `HFJudge`: any `AutoModelForCausalLM` from a local folder or the hub (`judge=hf judge_model=…`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffuse.contracts import is_autoregressive
from diffuse.errors import DiffuseError
from diffuse.run.load import load_run


@dataclass
class Score:
    nll: float  # nats, summed over the scored tokens
    tokens: int  # tokens scored (the first token after BOS onwards)


class DiffuseJudge:
    def __init__(self, module, tokenizer, name: str):
        if not is_autoregressive(module.objective):
            raise DiffuseError(
                f"judge={name} is a {module.objective.registry_name} checkpoint; a judge must be autoregressive "
                "(train one with objective=autoregressive, or use judge=hf judge_model=…)"
            )
        self.module, self.tokenizer, self.name = module, tokenizer, name

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[Score]:
        device = next(self.module.parameters()).device
        bos = self.tokenizer.bos_token_id
        out = []
        for text in texts:
            ids = [bos] + self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) < 2:
                out.append(Score(0.0, 0))
                continue
            ids = torch.tensor([ids], device=device)
            batch = {"input_ids": ids, "segment_ids": torch.ones_like(ids)}
            loss = self.module.objective.loss(self.module.backbone, batch, None, train=False)
            out.append(Score(float(loss.nll_sum), int(loss.n_tokens)))
        return out


class HFJudge:
    def __init__(self, model_name: str, device: torch.device):
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_name)
            self.model = AutoModelForCausalLM.from_pretrained(model_name).to(device).eval()
        except Exception as err:  # offline, unknown name, not a causal LM: one line, not a traceback
            raise DiffuseError(
                f"judge_model={model_name!r} could not be loaded ({type(err).__name__}); offline, give a local "
                "folder or judge=PATH to an autoregressive diffuse checkpoint"
            ) from None
        self.name = f"hf:{model_name}"
        self.max_len = getattr(self.model.config, "max_position_embeddings", None) or 1024

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[Score]:
        device = next(self.model.parameters()).device
        start = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        out = []
        for text in texts:
            ids = (start + self.tokenizer(text, add_special_tokens=False)["input_ids"])[: self.max_len]
            if len(ids) < 2:
                out.append(Score(0.0, 0))
                continue
            ids = torch.tensor([ids], device=device)
            logits = self.model(input_ids=ids).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum")
            out.append(Score(float(nll), ids.shape[1] - 1))
        return out


def build_judge(judge: str | None, judge_model: str | None, device, candidates=()):
    """The judge named by the config, else the first autoregressive candidate `(name, module,
    tokenizer)`, else None (gen-PPL is then skipped)."""
    if judge is None:
        for name, module, tokenizer in candidates:
            if is_autoregressive(module.objective):
                return DiffuseJudge(module, tokenizer, name)
        return None
    if str(judge) == "hf":
        if not judge_model:
            raise DiffuseError("judge=hf needs judge_model=<local folder or hub name>")
        return HFJudge(str(judge_model), device)
    _, tokenizer, module = load_run(str(judge), key="judge")
    return DiffuseJudge(module.to(device), tokenizer, str(judge))


def perplexity(scores: list[Score]) -> dict[str, float | None]:
    """Corpus-level: exp(Σ nll / Σ tokens) over every scored token, and the same in bits/token."""
    tokens = sum(s.tokens for s in scores)
    if tokens == 0:
        return {"ppl": None, "bpt": None}
    nll = sum(s.nll for s in scores) / tokens
    return {"ppl": math.exp(nll), "bpt": nll / math.log(2)}
