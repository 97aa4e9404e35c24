"""The prepared-data cache (diffuse/data/prepared.py): the same rows as tokenizing in memory, written once
and reused, keyed on what shapes them, written atomically, in small dtypes; resumed batches unchanged."""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import threading

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import diffuse.data.prepared as prepared
import diffuse.data.rows as data_rows
from conftest import call_main, write_corpus
from diffuse.data.datamodule import ResumableRandomSampler, TextDataModule
from diffuse.data.prepared import cache_key
from diffuse.data.rows import RowMaker
from diffuse.errors import DiffuseError
from test_sft import completion_rows, write_jsonl


def module(path, cache, name="text", tokenizer="byte", **kw):
    kw = {"seq_len": 32, "batch_size": 4, **kw}
    dm = TextDataModule(source={"name": name, "path": str(path)}, tokenizer={"name": tokenizer}, cache_dir=str(cache), **kw)
    dm.load()
    dm.setup("fit")
    return dm


def assert_same_rows(a, b):
    assert len(a) == len(b)
    rows_a, rows_b = a[:], b[:]
    assert set(rows_a) == set(rows_b)
    for column in rows_a:
        assert rows_a[column].dtype == rows_b[column].dtype == torch.long
        assert torch.equal(rows_a[column], rows_b[column]), column


@pytest.fixture
def messages(caplog):
    caplog.set_level(logging.INFO, logger="diffuse")
    return lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith("prepared data:")]


@pytest.mark.parametrize("source,pack", [("text", True), ("text", False), ("sft", False), ("sft", True)])
def test_prepared_rows_equal_the_in_memory_rows(tmp_path, corpus, monkeypatch, source, pack):
    # small chunks: rows are cut per chunk of documents, and both paths must cut them alike
    monkeypatch.setattr(prepared, "CHUNK", 64)
    monkeypatch.setattr(data_rows, "CHUNK", 64)
    path = corpus if source == "text" else write_jsonl(tmp_path / "c.jsonl", completion_rows(150))
    memory = module(path, tmp_path / "cache", source, pack=pack, prepared=False)
    mapped = module(path, tmp_path / "cache", source, pack=pack)
    for split in ("train", "validation"):
        assert isinstance(mapped.splits[split], prepared.PreparedRows)
        assert_same_rows(mapped.splits[split], memory.splits[split])
    assert set(mapped.splits["train"][0]) == ({"input_ids", "segment_ids"} | ({"prompt_mask"} if source == "sft" else set()))
    assert list(mapped.splits["train"])[-1]["input_ids"].shape == (32,)  # iteration ends at the last row


def test_a_second_setup_reuses_the_cache_without_tokenizing(tmp_path, corpus, monkeypatch, messages):
    first = module(corpus, tmp_path)
    folder = first.splits["train"].folder
    written = (folder / "meta.json").stat().st_mtime_ns
    assert messages()[0].startswith(f"prepared data: wrote {folder} (") and "rows" in messages()[0]

    def no_tokenizing(self, batch):
        raise AssertionError("the prepared rows should have been reused")

    monkeypatch.setattr(RowMaker, "encode", no_tokenizing)
    second = module(corpus, tmp_path)
    assert messages()[-2:] == [f"prepared data: reused {folder}", f"prepared data: reused {folder.parent / 'validation'}"]
    assert (folder / "meta.json").stat().st_mtime_ns == written
    assert torch.equal(next(iter(second.train_dataloader()))["input_ids"], next(iter(first.train_dataloader()))["input_ids"])
    small = module(corpus, tmp_path, train_tokens=100)  # the first rows of the same cache
    assert small.splits["train"].folder == folder and len(small.splits["train"]) == 3
    assert torch.equal(small.splits["train"][:]["input_ids"], first.splits["train"][:3]["input_ids"])


def test_the_key_changes_with_seq_len_tokenizer_and_file_content(tmp_path):
    path = write_corpus(tmp_path / "c.txt", paragraphs=60)

    def key(**kw):
        dm = TextDataModule(source={"name": "text", "path": str(path)}, tokenizer=kw.pop("tokenizer", {"name": "byte"}),
                            cache_dir=str(tmp_path / "cache"), **{"seq_len": 32, **kw})
        dm.load()
        return cache_key(dm.cache_parts())

    base = key()
    assert key() == base
    others = [key(seq_len=64), key(tokenizer={"name": "bpe", "vocab_size": 300, "min_frequency": 1}),
              key(pack=False), key(add_bos=False), key(seed=1)]
    write_corpus(path, paragraphs=60, seed=1)
    others.append(key())
    assert len({base, *others}) == len(others) + 1


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_half_written_temp_folder_is_not_used_and_a_killed_write_leaves_none(tmp_path, corpus, monkeypatch):
    memory = module(corpus, tmp_path / "memory", prepared=False)
    dm = TextDataModule(source={"name": "text", "path": str(corpus)}, tokenizer={"name": "byte"}, seq_len=32,
                        cache_dir=str(tmp_path))
    dm.load()
    root = tmp_path / "prepared" / cache_key(dm.cache_parts())
    stale = root / f".train.{prepared._owner().rsplit('-', 1)[0]}-{dead_pid()}.tmp"
    stale.mkdir(parents=True)
    np.save(stale / "input_ids.npy", np.zeros((1, 32), np.uint16))
    (stale / "meta.json").write_text(json.dumps({"rows": 1, "dtypes": {"input_ids": "uint16"}}))
    other_host = root / ".train.elsewhere-1.tmp"  # another host's live write (a shared cache_dir) is left alone
    other_host.mkdir()

    calls, encode = itertools.count(), RowMaker.encode

    def killed_on_the_second_chunk(self, batch):
        if next(calls) == 1:
            raise KeyboardInterrupt
        return encode(self, batch)

    monkeypatch.setattr(prepared, "CHUNK", 50)
    with monkeypatch.context() as m:
        m.setattr(RowMaker, "encode", killed_on_the_second_chunk)
        with pytest.raises(KeyboardInterrupt):
            dm.setup("fit")
    assert sorted(p.name for p in root.iterdir()) == [other_host.name]  # no half cache, no temp of ours
    monkeypatch.setattr(prepared, "CHUNK", 2000)
    dm.splits = {}
    dm.setup("fit")
    assert not stale.exists() and other_host.exists()
    assert_same_rows(dm.splits["train"], memory.splits["train"])


def test_small_dtypes(tmp_path, corpus):
    dm = module(corpus, tmp_path)
    meta = dm.splits["train"].meta
    assert meta["dtypes"] == {"input_ids": "uint16", "segment_ids": "uint8"} and meta["vocab_size"] == 260
    assert np.load(dm.splits["train"].folder / "input_ids.npy", mmap_mode="r").dtype == np.uint16
    rows = {"input_ids": np.full((3, 300), 69_999), "segment_ids": np.full((3, 300), 300)}
    prepared.write_split(tmp_path / "big", [{"text": "a"}], lambda batch: rows,
                         {"seq_len": 300, "vocab_size": 70_000})
    meta = json.loads((tmp_path / "big" / "meta.json").read_text())
    assert meta["dtypes"] == {"input_ids": "uint32", "segment_ids": "uint16"} and meta["rows"] == 3
    assert prepared.PreparedRows(tmp_path / "big")[2]["input_ids"].tolist() == [69_999] * 300


def test_resumed_batches_are_the_uninterrupted_ones(tmp_path, corpus):
    memory, mapped = module(corpus, tmp_path, prepared=False), module(corpus, tmp_path)

    def batches(dm, start=0, n=12):
        ds = dm.splits["train"]
        loader = DataLoader(ds, batch_size=4, sampler=ResumableRandomSampler(len(ds), seed=0, start=start * 4))
        return [b["input_ids"] for b in itertools.islice(loader, n)]

    whole = batches(mapped)
    assert all(torch.equal(a, b) for a, b in zip(whole, batches(memory)))
    assert all(torch.equal(a, b) for a, b in zip(whole[5:], batches(mapped, start=5, n=7)))


def test_other_ranks_wait_for_local_rank_zero(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(DiffuseError, match=f"prepared data: {tmp_path / 'train' / 'meta.json'} did not appear"):
        prepared.open_split(tmp_path, "train", None, None, {}, wait_s=0.2)
    marker = tmp_path / "later" / "meta.json"
    marker.parent.mkdir()
    threading.Timer(0.3, marker.write_text, ["{}"]).start()
    prepared.wait_for(marker, timeout=10, poll=0.05)
    assert marker.is_file()


def test_python_m_diffuse_prepare_writes_what_train_reuses(tmp_path, corpus, messages):
    result = call_main("diffuse.prepare", "data=text", f"data.path={corpus}", "tokenizer=byte", "data.seq_len=32",
                       f"paths.cache_dir={tmp_path}")
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["train", "validation"] and "rows of 32 tokens" in lines[0]
    module(corpus, tmp_path, batch_size=16)  # batch sizes do not shape the rows
    assert messages()[-2] == f"prepared data: reused {lines[0].split()[1]}"
    bad = call_main("diffuse.prepare", "data=text", f"data.path={corpus}", "data.prepared=false")
    assert bad.returncode == 2 and "data.prepared=false" in bad.stderr


def test_a_prepared_run_reads_no_text_and_trains_no_tokenizer(tmp_path, corpus, monkeypatch):
    first = module(corpus, tmp_path, tokenizer="bpe")
    from diffuse.data.sources import TextSource

    def no_reading(self, seed, cache_dir):
        raise AssertionError("the text should not be read: its rows are prepared")

    monkeypatch.setattr(TextSource, "load", no_reading)
    monkeypatch.setattr(RowMaker, "encode", no_reading)
    second = module(corpus, tmp_path, tokenizer="bpe")
    assert second.tokenizer.backend_tokenizer.to_str() == first.tokenizer.backend_tokenizer.to_str()
    assert_same_rows(second.splits["train"], first.splits["train"])
    with pytest.raises(AssertionError, match="should not be read"):
        second.raw  # loaded on demand (the end-of-run readability check uses it)


def test_rows_do_not_depend_on_the_number_of_processes(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(prepared, "CHUNK", 50)  # several chunks, so the pool is used
    one = module(corpus, tmp_path / "one", num_proc=1)
    two = module(corpus, tmp_path / "two", num_proc=2)
    assert len(one.splits["train"]) > 3
    for split in ("train", "validation"):
        assert_same_rows(two.splits[split], one.splits[split])
    with pytest.raises(DiffuseError, match="data.num_proc=0"):
        module(corpus, tmp_path, num_proc=0)


def test_the_utf8_check_reads_in_blocks_and_names_the_byte(tmp_path):
    from diffuse.data.sources import _check_utf8

    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo wörld ".encode() * 10 + b"\xff tail")
    with pytest.raises(DiffuseError, match=r"bad.txt is not UTF-8 \(byte 140\)"):
        _check_utf8(bad, block=7)  # a block boundary falls inside 'é' and 'ö': still valid
    good = tmp_path / "good.txt"
    good.write_bytes("héllo wörld ".encode() * 10)
    _check_utf8(good, block=7)
    cut = tmp_path / "cut.txt"
    cut.write_bytes("héllo".encode()[:2])
    with pytest.raises(DiffuseError, match="ends inside a character"):
        _check_utf8(cut, block=7)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n  \n")
    with pytest.raises(DiffuseError, match="blank.txt is empty"):
        _check_utf8(blank, block=2)


def test_bpe_trains_on_a_bounded_sample(tmp_path):
    from diffuse.data.tokenizers import BPETokenizer

    seen = []

    def texts():
        for i in range(1000):
            seen.append(i)
            yield f"document {i} " * 10

    BPETokenizer(vocab_size=300, min_frequency=1, train_chars=1000)(texts(), cache_dir=str(tmp_path), fingerprint="f")
    assert len(seen) == 10  # 110 characters each: the 10th crosses 1000, nothing after it is read
    files = sorted((tmp_path / "tokenizers").glob("bpe-*.json"))
    BPETokenizer(vocab_size=300, min_frequency=1, train_chars=2000)(texts(), cache_dir=str(tmp_path), fingerprint="f")
    assert len(sorted((tmp_path / "tokenizers").glob("bpe-*.json"))) == len(files) + 1  # its own cache entry
    with pytest.raises(DiffuseError, match="tokenizer.train_chars=0"):
        BPETokenizer(train_chars=0)
