"""data=sft: JSONL prompt/answer pairs, the prompt_mask, and the SFT loss (prompt ignored, per-sample
normalisation); recipe=llada_sft end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_llada import PLUGIN_METRICS, SPECIAL, ContextFree, read_metric_names, recording_corrupt, run_train

from diffuse.data import TextDataModule
from diffuse.data.packing import pack_documents, pad_documents
from diffuse.data.sft import SFTSource, plain_chat
from diffuse.data.tokenizers import ByteTokenizer
from diffuse.errors import DiffuseError
from diffuse.objectives.llada import LLaDA
from diffuse.schedules import build_schedule


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def completion_rows(n=20):
    return [{"prompt": f"Q: {i}+{i}=? A: ", "completion": str(2 * i)} for i in range(n)]


def conversation_rows(n=20):
    return [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}!"}]}
            for i in range(n)]


def datamodule(path, tmp_path, pack=False, seq_len=32):
    dm = TextDataModule(source={"name": "sft", "path": str(path)}, tokenizer={"name": "byte"}, seq_len=seq_len,
                        batch_size=4, pack=pack, cache_dir=str(tmp_path / "cache"))
    dm.load()
    dm.setup()
    return dm


def documents(tok, split):
    """(prompt, answer) text of every document, read back from the rows (packed ones may split a
    document across rows: the stream is re-cut at each BOS)."""
    ids = torch.cat([r["input_ids"][r["segment_ids"] > 0] for r in split]).tolist()
    marks = torch.cat([r["prompt_mask"][r["segment_ids"] > 0] for r in split]).tolist()
    docs, out = [], []
    for i, m in zip(ids, marks):
        if i == tok.bos_token_id:
            docs.append([])
        docs[-1].append((i, m))
    for doc in docs:
        prompt = tok.decode([i for i, m in doc if m], skip_special_tokens=True)
        answer = tok.decode([i for i, m in doc if not m], skip_special_tokens=True)
        out.append((prompt, answer))
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_completion_rows_carry_a_prompt_mask(tmp_path, pack):
    dm = datamodule(write_jsonl(tmp_path / "c.jsonl", completion_rows()), tmp_path, pack=pack)
    docs = documents(dm.tokenizer, dm.splits["train"])
    assert len(docs) == len(dm.raw["train"])
    for prompt, answer in docs:
        i = int(prompt.split()[1].split("+")[0])
        assert (prompt, answer) == (f"Q: {i}+{i}=? A: ", str(2 * i))
    for row in dm.splits["train"]:
        assert (row["prompt_mask"][row["segment_ids"] == 0] == 0).all()
    assert set(dm.splits["train"][0]) == {"input_ids", "segment_ids", "prompt_mask"}


def test_conversations_use_the_plain_template_or_the_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", conversation_rows())
    dm = datamodule(path, tmp_path)
    prompt, answer = documents(dm.tokenizer, dm.splits["train"])[0]
    assert prompt.startswith("user: say ") and prompt.endswith("\nassistant: ") and answer.endswith("!")
    assert plain_chat([{"role": "user", "content": "hi"}], True) == "user: hi\nassistant: "

    tok = ByteTokenizer()()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    source = SFTSource(path=str(path))
    raw, _ = source.load(seed=0, cache_dir=str(tmp_path))
    row = source.render(raw, tok)["train"][0]
    assert row["prompt"].startswith("<user>say ") and row["prompt"].endswith("<assistant>")
    assert row["text"].startswith(row["prompt"]) and row["text"].endswith("!")


def test_bad_sft_files_fail_in_one_line(tmp_path):
    with pytest.raises(DiffuseError, match="columns"):
        SFTSource(path=str(write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}] * 3))).load(0, str(tmp_path))
    with pytest.raises(DiffuseError, match="format"):
        SFTSource(path=str(write_jsonl(tmp_path / "c.jsonl", completion_rows())), format="conversation").load(
            0, str(tmp_path))
    rows = [{"messages": [{"role": "user", "content": "hi"}]}] * 3
    with pytest.raises(DiffuseError, match="assistant"):
        SFTSource(path=str(write_jsonl(tmp_path / "u.jsonl", rows))).load(0, str(tmp_path))
    with pytest.raises(DiffuseError, match="data.format"):
        SFTSource(path="x", format="chatml")


@pytest.mark.parametrize("bad,match", [
    ({"prompt": "Q: ", "completion": None}, "row 3 has no 'completion'"),
    ({"prompt": ["Q"], "completion": "A"}, "row 3 has prompt=\\['Q'\\] \\(list, not a string\\)"),
])
def test_completion_rows_need_string_prompt_and_completion(bad, match, tmp_path):
    rows = completion_rows(2) + [bad] + completion_rows(3)
    with pytest.raises(DiffuseError, match=match):
        SFTSource(path=str(write_jsonl(tmp_path / "c.jsonl", rows))).load(0, str(tmp_path))


def test_conversation_messages_need_string_role_and_content(tmp_path):
    rows = conversation_rows(2) + [{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}]
    with pytest.raises(DiffuseError, match="row 3, message 1 has no 'role'"):
        SFTSource(path=str(write_jsonl(tmp_path / "m.jsonl", rows))).load(0, str(tmp_path))


def test_a_folder_of_jsonl_skips_hidden_and_other_files(tmp_path):
    folder = tmp_path / "sft"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    write_jsonl(folder / "train.jsonl", completion_rows(20))
    write_jsonl(folder / ".ipynb_checkpoints" / "train-checkpoint.jsonl", [{"text": "not sft"}])
    (folder / "notes.txt").write_text("not JSONL\n")
    dd, _ = SFTSource(path=str(folder)).load(0, str(tmp_path))
    assert len(dd["train"]) + len(dd["validation"]) == 20


def test_packing_and_padding_carry_extra_columns():
    docs, marks = [[5, 6, 7], [8, 9]], [[1, 1, 0], [1, 0]]
    packed = pack_documents(docs, 4, 0, extra={"prompt_mask": marks})
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8], [9, 0, 0, 0]]
    assert packed["prompt_mask"].tolist() == [[1, 1, 0, 1], [0, 0, 0, 0]]
    padded = pad_documents(docs, 4, 0, extra={"prompt_mask": marks})
    assert padded["prompt_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def sft_batch():
    """Two samples in one packed row and one alone: prompts (incl. BOS) of 3, 2, 4 tokens, answers of 4, 2, 6."""
    ids = torch.tensor([[1, 10, 11, 20, 21, 22, 23, 1, 12, 24, 25, 0],
                        [1, 13, 14, 15, 26, 27, 28, 29, 30, 31, 0, 0]])
    seg = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0],
                        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]])
    prompt = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0],
                           [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]])
    return {"input_ids": ids, "segment_ids": seg, "prompt_mask": prompt}


def test_sft_loss_ignores_prompt_tokens_and_normalises_per_sample():
    V = 32
    table = torch.randn(V, generator=torch.Generator().manual_seed(0))
    model, batch = ContextFree(table), sft_batch()
    obj = LLaDA(SPECIAL, build_schedule("linear"), min_mask_ratio=0.999)  # p ≈ 1: every answer token masked
    seen = recording_corrupt(obj)
    loss = obj.loss(model, batch, torch.Generator().manual_seed(0)).loss
    answer = (batch["prompt_mask"] == 0) & (batch["segment_ids"] > 0)
    assert ((seen["z"] == SPECIAL.mask) == answer).all()

    table[SPECIAL.mask] = -math.inf
    ce = -table.log_softmax(-1)
    per_sample = [ce[torch.tensor(a)].mean() for a in ([20, 21, 22, 23], [24, 25], [26, 27, 28, 29, 30, 31])]
    assert float(loss) == pytest.approx(float(sum(per_sample) / 3), rel=2e-3)  # p ∈ [0.999, 1]

    other = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["prompt_mask"].bool() & (batch["input_ids"] != 1), 9))
    assert float(obj.loss(model, other, torch.Generator().manual_seed(0)).loss) == pytest.approx(float(loss))


def test_recipe_llada_sft_trains_offline(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows(30))
    run_dir = run_train(tmp_path / "run", "recipe=llada_sft", f"data.path={data}")
    assert {f"train/{m}" for m in PLUGIN_METRICS} | {"val/nelbo"} <= read_metric_names(run_dir)
