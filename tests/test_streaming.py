"""data.streaming: a corpus read as training consumes it (diffuse/data/streaming.py) — the prepared path's rows,
shuffled per epoch, resumable and shardable by skipping; hub sources fail offline in one line."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from conftest import call_main, tiny_args, write_corpus
from diffuse.data.datamodule import TextDataModule
from diffuse.data.sources import TextSource
from diffuse.data.streaming import StreamingRows
from diffuse.errors import DiffuseError
from test_prepared_data import assert_same_rows
from test_training import losses_by_step


def module(tmp_path, **kw):
    source = {"name": "text", "path": str(kw.pop("path")), **kw.pop("source", {})}
    dm = TextDataModule(source=source, tokenizer={"name": "byte"}, seq_len=32, batch_size=4, cache_dir=str(tmp_path),
                        **kw)
    dm.load()
    dm.setup("fit")
    return dm


def take(rows, n):
    it = iter(rows)
    return [next(it) for _ in range(n)]


def test_a_stream_read_in_order_gives_the_prepared_rows(tmp_path, corpus):
    val = write_corpus(tmp_path / "val.txt", paragraphs=20, seed=3)
    prepared = module(tmp_path / "p", path=corpus, source={"val_path": str(val)})
    streamed = module(tmp_path / "s", path=corpus, source={"val_path": str(val)}, streaming=True)
    train = streamed.splits["train"]
    assert isinstance(train, StreamingRows)
    train.shuffle_buffer = 1  # no shuffling: file order, as the prepared rows are
    n = len(prepared.splits["train"])
    rows = list(islice(train.epoch(0), n + 1))
    assert len(rows) == n  # the epoch ends with the corpus
    for column, mapped in prepared.splits["train"][:].items():
        assert torch.equal(torch.stack([r[column] for r in rows]), mapped), column
    assert_same_rows(streamed.splits["validation"], prepared.splits["validation"])


def test_resumed_and_sharded_streams_read_the_uninterrupted_rows(tmp_path, corpus):
    dm = module(tmp_path, path=corpus, streaming=True)
    train = dm.splits["train"]
    n = sum(1 for _ in train.epoch(0)) + 10  # into the second epoch, shuffled differently, continuing the stream
    whole = take(train.at(0), n)
    assert not torch.equal(train.epoch(0).__next__()["input_ids"], train.epoch(1).__next__()["input_ids"])
    resumed = take(train.at(7), n - 7)
    ranks = [take(train.at(3, r, 2), 10) for r in (0, 1)]
    for a, b in zip(resumed, whole[7:]):
        assert torch.equal(a["input_ids"], b["input_ids"])
    for i in range(10):
        for r in (0, 1):
            assert torch.equal(ranks[r][i]["input_ids"], whole[6 + 2 * i + r]["input_ids"])


def test_the_held_out_documents_are_every_kth_and_disjoint_from_train(tmp_path, corpus):
    streams = TextSource(path=str(corpus), val_fraction=0.1).stream(str(tmp_path))
    train = [d["text"] for d in streams["train"]]
    val = [d["text"] for d in streams["validation"]]
    documents = [d["text"] for d in TextSource(path=str(corpus), val_path=str(corpus)).stream(str(tmp_path))["train"]]
    assert val == documents[::10] and train == [d for i, d in enumerate(documents) if i % 10]


def test_train_and_resume_streamed(corpus, tmp_path):
    def run(run_dir, *extra):
        result = call_main("diffuse.train", *tiny_args(corpus, run_dir, "data.streaming=true", *extra))
        assert result.returncode == 0, result
        return result

    run(tmp_path / "a", "trainer.max_steps=4")
    run(tmp_path / "b", "trainer.max_steps=2")
    run(tmp_path / "b", "trainer.max_steps=4", "resume=true")
    a, b = losses_by_step(tmp_path / "a"), losses_by_step(tmp_path / "b")
    for step in (2, 3):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)


def test_refusals_name_the_key(tmp_path, corpus):
    with pytest.raises(DiffuseError, match="data.streaming=true: data=sft cannot be streamed"):
        TextDataModule(source={"name": "sft", "path": str(corpus)}, tokenizer={"name": "byte"}, streaming=True)
    with pytest.raises(DiffuseError, match="data.train_tokens=64 needs the whole split"):
        module(tmp_path, path=corpus, streaming=True, train_tokens=64)
    with pytest.raises(DiffuseError, match="data=hub needs data.hub_name"):
        TextDataModule(source={"name": "hub"}, tokenizer={"name": "byte"})


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_a_hub_dataset_offline_fails_in_one_line_naming_the_local_source(tmp_path, monkeypatch, streaming):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = call_main("diffuse.train", "data=hub", "data.hub_name=nobody/no-such-corpus", f"data.streaming={streaming}",
                       "tokenizer=byte", f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "data.hub_name=nobody/no-such-corpus" in last and "data=text data.path=" in last, result.stderr
