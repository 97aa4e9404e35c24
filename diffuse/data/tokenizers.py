"""Tokenizers: byte-level BPE trained on the training split, raw bytes, or any HF tokenizer.

All three end as a `transformers.PreTrainedTokenizerFast` with the same four special tokens
([PAD], [BOS], [EOS], [MASK]) so the rest of diffuse sees one type, and a run exports its tokenizer
as a plain Hugging Face folder. `vocab_size` of the model is `len(tokenizer)`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from diffuse.core.io import write_text_atomic
from diffuse.errors import DiffuseError
from diffuse.registry import TOKENIZERS

SPECIALS = {"pad_token": "[PAD]", "bos_token": "[BOS]", "eos_token": "[EOS]", "mask_token": "[MASK]"}


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def tokenizer_from_json(text: str) -> PreTrainedTokenizerFast:
    return _wrap(Tokenizer.from_str(text))


def tokenizer_state(tok: PreTrainedTokenizerFast) -> dict:
    """Everything needed to rebuild `tok` without files (stored inside checkpoints)."""
    specials = {k: getattr(tok, k) for k in SPECIALS}
    return {"json": tok.backend_tokenizer.to_str(), "specials": specials,
            "chat_template": getattr(tok, "chat_template", None)}


def tokenizer_from_state(state: dict) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(state["json"]), **state["specials"])
    if state.get("chat_template"):
        tok.chat_template = state["chat_template"]
    return tok


def with_bos(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A copy of `tok` that starts every encoding with BOS, as diffuse's rows do (data/rows.py adds it): for
    software that tokenizes with the folder's tokenizer alone (lm-eval, vLLM). Unchanged when it already does."""
    if tok.bos_token_id is None or tok("a")["input_ids"][:1] == [tok.bos_token_id]:
        return tok
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    bos = tok.bos_token
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.bos_token_id)])
    out = PreTrainedTokenizerFast(tokenizer_object=backend, **{k: getattr(tok, k) for k in SPECIALS})
    if getattr(tok, "chat_template", None):
        out.chat_template = tok.chat_template
    return out


@TOKENIZERS.register("byte")
class ByteTokenizer:
    """256 byte symbols + the specials: never unknown, no training, long sequences."""

    def __call__(self, texts: Iterable[str] | None = None, cache_dir: str | None = None, fingerprint: str = ""):
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        vocab = {s: i for i, s in enumerate(sorted(alphabet))}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(SPECIALS.values()))
        return _wrap(tok)


@TOKENIZERS.register("bpe")
class BPETokenizer:
    """Byte-level BPE trained with `tokenizers` on (a sample of) the training text; cached by the source's
    fingerprint. It trains on the first `train_chars` characters of the training split (seeded and shuffled
    unless data.val_path is given), so a corpus larger than RAM trains in bounded memory and time."""

    def __init__(self, vocab_size: int = 8192, min_frequency: int = 2, train_chars: int | None = 100_000_000):
        if vocab_size <= 256 + len(SPECIALS):
            raise DiffuseError(f"tokenizer.vocab_size={vocab_size} must exceed 260 (256 bytes + 4 specials)")
        if train_chars is not None and int(train_chars) <= 0:
            raise DiffuseError(f"tokenizer.train_chars={train_chars} must be a positive number of characters or null (all)")
        self.vocab_size = vocab_size
        self.min_frequency = min_frequency
        self.train_chars = None if train_chars is None else int(train_chars)

    def __call__(self, texts: Iterable[str], cache_dir: str | None = None, fingerprint: str = ""):
        cache = None
        if cache_dir:
            spec = f"{fingerprint}|{self.vocab_size}|{self.min_frequency}|{self.train_chars}"
            cache = Path(cache_dir) / "tokenizers" / f"bpe-{hashlib.sha1(spec.encode()).hexdigest()[:16]}.json"
            if cache.exists():
                return tokenizer_from_json(cache.read_text())
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=list(SPECIALS.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_batches(_first_chars(texts, self.train_chars)), trainer=trainer)
        if cache is not None:
            write_text_atomic(cache, tok.to_str())  # concurrent sweep jobs never read half a file
        return _wrap(tok)


@TOKENIZERS.register("hf")
class HFTokenizer:
    """`AutoTokenizer` from a local folder or a hub name; missing specials are added."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, texts=None, cache_dir: str | None = None, fingerprint: str = ""):
        try:
            tok = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as err:
            raise DiffuseError(
                f"tokenizer.path={self.path!r} could not be loaded ({type(err).__name__}); offline, use a "
                "local folder or tokenizer=bpe / tokenizer=byte"
            ) from None
        config = Path(self.path) / "config.json"  # LLaDA / Dream: the [MASK] id is in the model's config
        if tok.mask_token is None and config.is_file():
            mask_id = json.loads(config.read_text()).get("mask_token_id")
            if mask_id is not None and 0 <= mask_id < len(tok):
                tok.mask_token = tok.convert_ids_to_tokens(mask_id)
        missing = {k: v for k, v in SPECIALS.items() if getattr(tok, k) is None}
        if missing:
            tok.add_special_tokens(missing)
        return tok


def _first_chars(texts: Iterable[str], limit: int | None) -> Iterator[str]:
    """Texts until `limit` characters have been given (the one that crosses it included)."""
    seen = 0
    for text in texts:
        seen += len(text)
        yield text
        if limit is not None and seen >= limit:
            return  # before asking for the next: an unread text is never loaded


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
