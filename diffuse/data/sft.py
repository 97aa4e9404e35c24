"""Supervised fine-tuning data: local JSONL of prompt/answer pairs (`data=sft`).

Two formats, read with `datasets.load_dataset("json")`:
- `completion`:   {"prompt": "...", "completion": "..."}  — text = prompt + completion, verbatim
                  (no separator is inserted: end prompts with a space or newline if you want one);
- `conversation`: {"messages": [{"role": "user", "content": "..."}, …, {"role": "assistant", …}]}
                  — the last message is the answer (it must be the assistant's); every earlier turn
                  is prompt. Rendered with the tokenizer's chat template when it has one, else with
                  the plain template below.

The source yields `prompt` and `text` columns (text starts with prompt); the DataModule tokenizes the
two parts separately and adds a per-token `prompt_mask`, so the objective never masks the prompt.
"""

from __future__ import annotations

import hashlib

import datasets

from diffuse.data.sources import _files, _split, fingerprint_files
from diffuse.errors import DiffuseError
from diffuse.registry import DATASETS

FORMATS = ("auto", "completion", "conversation")
JSONL_SUFFIXES = (".jsonl", ".json")  # what a data.path folder contributes (hidden paths skipped)


def plain_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    """The plain template: one `role: content` line per message; a generation prompt is `assistant: `."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def _not_a_string(key: str, value) -> str:
    return f"no {key!r}" if value is None else f"{key}={repr(value)[:40]} ({type(value).__name__}, not a string)"


def check_rows(ds: datasets.Dataset, fmt: str, names: str) -> None:
    """Every row has the strings its format needs; the first that does not is named (rows count from 1)."""
    if fmt == "completion":
        for i, pair in enumerate(zip(ds["prompt"], ds["completion"]), 1):
            for key, value in zip(("prompt", "completion"), pair):
                if not isinstance(value, str):
                    raise DiffuseError(f"data file {names}: row {i} has {_not_a_string(key, value)}; "
                                       "every row needs a string 'prompt' and 'completion'")
        return
    for i, msgs in enumerate(ds["messages"], 1):
        if not isinstance(msgs, list) or not msgs:
            raise DiffuseError(f"data file {names}: row {i} has no messages")
        for j, m in enumerate(msgs, 1):
            for key in ("role", "content"):
                value = m.get(key) if isinstance(m, dict) else None
                if not isinstance(value, str):
                    raise DiffuseError(f"data file {names}: row {i}, message {j} has {_not_a_string(key, value)}; "
                                       "every message needs a string 'role' and 'content'")
        if msgs[-1]["role"] != "assistant":
            raise DiffuseError(f"data file {names}: row {i} does not end with an assistant message")


@DATASETS.register("sft")
class SFTSource:
    def __init__(self, path=None, val_path=None, format: str = "auto", val_fraction: float = 0.05):
        if path is None:
            raise DiffuseError("data=sft needs data.path=/path/to/file.jsonl")
        if format not in FORMATS:
            raise DiffuseError(f"data.format={format!r} must be one of {', '.join(FORMATS)}")
        self.path, self.val_path, self.format, self.val_fraction = path, val_path, format, val_fraction

    def fingerprint(self, cache_dir: str) -> str:
        files = _files(self.path, JSONL_SUFFIXES, "JSONL", check=False)
        if self.val_path is not None:
            files += _files(self.val_path, JSONL_SUFFIXES, "JSONL", check=False)
        return hashlib.sha1(f"{fingerprint_files(files)}|{self.format}".encode()).hexdigest()

    def load(self, seed: int, cache_dir: str) -> tuple[datasets.DatasetDict, str]:
        train = self._read(_files(self.path, JSONL_SUFFIXES, "JSONL"))
        if self.val_path is None:
            dd = _split(train, self.val_fraction, seed)
        else:
            val = self._read(_files(self.val_path, JSONL_SUFFIXES, "JSONL"))
            dd = datasets.DatasetDict(train=train, validation=val)
        return dd, self.fingerprint(cache_dir)

    def _read(self, files) -> datasets.Dataset:
        names = ", ".join(map(str, files))
        try:
            ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
        except Exception as err:
            raise DiffuseError(f"data.path={names} is not readable JSONL ({type(err).__name__})") from None
        fmt = self._format_of(ds.column_names, names)
        check_rows(ds, fmt, names)
        if fmt == "completion":
            return ds.map(lambda r: {"prompt": r["prompt"], "text": r["prompt"] + r["completion"]},
                          remove_columns=ds.column_names)
        # plain rendering now (it trains a BPE tokenizer); `render` redoes it with a chat template
        return ds.map(lambda r: {"prompt": plain_chat(r["messages"][:-1], True),
                                 "text": plain_chat(r["messages"][:-1], True) + r["messages"][-1]["content"]})

    def _format_of(self, columns: list[str], names: str) -> str:
        found = ("conversation" if "messages" in columns
                 else "completion" if {"prompt", "completion"} <= set(columns) else None)
        if found is None or self.format not in ("auto", found):
            need = {"completion": "'prompt' and 'completion'", "conversation": "'messages'",
                    "auto": "'messages' or 'prompt' and 'completion'"}[self.format]
            raise DiffuseError(f"data file {names} has columns {', '.join(columns)}; "
                               f"data.format={self.format} needs {need}")
        return found

    def render(self, raw: datasets.DatasetDict, tokenizer) -> datasets.DatasetDict:
        """With the tokenizer known: conversations go through its chat template when it has one."""
        if getattr(tokenizer, "chat_template", None) is None or "messages" not in raw["train"].column_names:
            return raw.remove_columns([c for c in ("messages",) if c in raw["train"].column_names])

        def chat(row):
            prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            if not text.startswith(prompt):
                raise DiffuseError("the tokenizer's chat template renders a conversation that does not start "
                                   "with its own generation prompt; use a tokenizer without a template")
            return {"prompt": prompt, "text": text}

        return raw.map(chat, remove_columns=["messages"])
