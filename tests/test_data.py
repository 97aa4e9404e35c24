"""Data: packing, the seeded split, the resumable sampler, tokenizers, the embedded corpus."""

import itertools
import random

import pytest
import torch

from diffuse.data.datamodule import ResumableRandomSampler, TextDataModule
from diffuse.data.packing import pack_documents, pad_documents
from diffuse.data.sources import EmbeddedSource, TextSource
from diffuse.data.tokenizers import BPETokenizer, ByteTokenizer, tokenizer_from_state, tokenizer_state

TEXT = "Hello, world! Café naïve façade — 東京 🙂 ✓\nsecond line\ttab"


# -- packing --------------------------------------------------------------------------------------
def test_pack_documents_worked_example():
    out = {k: v.tolist() for k, v in pack_documents([[1] * 5, [2] * 3, [3] * 10], seq_len=8, pad_id=0).items()}
    assert out["input_ids"] == [[1] * 5 + [2] * 3, [3] * 8, [3] * 2 + [0] * 6]
    assert out["segment_ids"] == [[1] * 5 + [2] * 3, [1] * 8, [1] * 2 + [0] * 6]


def test_pack_documents_segments_restart_per_document_and_per_row():
    rng = random.Random(0)
    docs = [[rng.randrange(1, 100) for _ in range(rng.randint(1, 20))] for _ in range(50)]
    tagged = [(i, t) for i, d in enumerate(docs) for t in d]  # (document, token) in stream order
    out = {k: v.tolist() for k, v in pack_documents(docs, seq_len=16, pad_id=0).items()}
    flat_ids = [t for row in out["input_ids"] for t in row]
    flat_seg = [s for row in out["segment_ids"] for s in row]
    assert all(len(row) == 16 for row in out["input_ids"])
    n = len(tagged)
    assert flat_ids[:n] == [t for _, t in tagged] and set(flat_ids[n:]) <= {0} and set(flat_seg[n:]) <= {0}
    for r, row in enumerate(out["segment_ids"]):
        docs_in_row = [tagged[r * 16 + j][0] for j in range(16) if r * 16 + j < n]
        # segment k+1 ⇔ the (k+1)-th distinct document of this row
        expected = [sorted(set(docs_in_row)).index(d) + 1 for d in docs_in_row]
        assert row[: len(expected)] == expected


def test_pad_documents_one_per_row_truncated():
    out = {k: v.tolist() for k, v in pad_documents([[5, 6, 7], list(range(1, 12))], seq_len=8, pad_id=0).items()}
    assert out["input_ids"] == [[5, 6, 7, 0, 0, 0, 0, 0], list(range(1, 9))]
    assert out["segment_ids"] == [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]


# -- split and sampler ----------------------------------------------------------------------------
def test_a_folder_contributes_its_text_files_only(corpus, tmp_path, monkeypatch):
    """The rule of diffuse/data/sources.py: hidden paths and non-text files are skipped, the count logged."""
    import diffuse.data.sources as sources

    logged = []
    monkeypatch.setattr(sources.log, "info", lambda msg, *a: logged.append(msg % a))
    folder = tmp_path / "corpus"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "sub").mkdir()
    (folder / "a.txt").write_text(corpus.read_text())
    (folder / "sub" / "B.TXT").write_text("Second file.\n")
    (folder / "README").write_text("No suffix: text too.\n")
    (folder / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("A notebook's hidden copy.\n")
    (folder / ".hidden.txt").write_text("A hidden file.\n")
    (folder / "conf.json").write_text('{"lr": 0.001}\n')
    assert sources._files(str(folder)) == [folder / "README", folder / "a.txt", folder / "sub" / "B.TXT"]
    assert logged == [f"data.path={folder}: 3 text file(s) read (skipped: 2 hidden; 1 not text (conf.json))"]
    assert sources._files(str(folder / "conf.json")) == [folder / "conf.json"]  # named directly: read


def test_split_is_deterministic_and_seeded(corpus, tmp_path):
    def split(seed):
        dd, fingerprint = TextSource(path=str(corpus), val_fraction=0.1).load(seed=seed, cache_dir=str(tmp_path))
        return list(dd["train"]["text"]), list(dd["validation"]["text"]), fingerprint

    a, b, c = split(0), split(0), split(1)
    assert a == b
    assert a[1] != c[1]  # another seed, another validation set
    assert len(a[1]) == pytest.approx(0.1 * (len(a[0]) + len(a[1])), abs=1)
    assert sorted(a[0] + a[1]) == sorted(c[0] + c[1])  # same documents, split differently


@pytest.mark.parametrize("k", [0, 3, 10, 27])
def test_resumable_sampler_started_at_k_gives_the_stream_tail(k):
    stream = list(itertools.islice(iter(ResumableRandomSampler(10, seed=4)), 60))
    for epoch in range(6):  # each epoch is a permutation
        assert sorted(stream[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    resumed = list(itertools.islice(iter(ResumableRandomSampler(10, seed=4, start=k)), 60 - k))
    assert resumed == stream[k:]
    assert stream != list(itertools.islice(iter(ResumableRandomSampler(10, seed=5)), 60))


def test_resumable_sampler_ranks_interleave_one_stream():
    stream = list(itertools.islice(iter(ResumableRandomSampler(7, seed=1)), 40))
    for rank in range(2):
        shard = list(itertools.islice(iter(ResumableRandomSampler(7, seed=1, start=3, rank=rank, world_size=2)), 10))
        assert shard == stream[6 + rank :: 2][:10]


# -- tokenizers -----------------------------------------------------------------------------------
def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT.encode("utf-8"))  # one id per byte
    assert tok.decode(ids) == TEXT
    assert len(tok) == 260 and max(ids) < 256
    specials = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id}
    assert specials == {256, 257, 258, 259}


def test_bpe_tokenizer_is_cached_and_reloads_to_the_same_ids(corpus, tmp_path):
    texts = corpus.read_text().split("\n\n")
    first = BPETokenizer(vocab_size=320, min_frequency=1)(iter(texts), cache_dir=str(tmp_path), fingerprint="abc")
    cached = list((tmp_path / "tokenizers").glob("bpe-*.json"))
    assert len(cached) == 1

    def must_not_train():
        raise AssertionError("the cached tokenizer should have been loaded, not retrained")
        yield

    again = BPETokenizer(vocab_size=320, min_frequency=1)(must_not_train(), cache_dir=str(tmp_path), fingerprint="abc")
    sample = texts[:20] + [TEXT]
    assert again(sample)["input_ids"] == first(sample)["input_ids"]
    assert first.decode(first(TEXT, add_special_tokens=False)["input_ids"]) == TEXT  # byte-level: lossless
    assert len(first) <= 320 and first.mask_token_id is not None
    BPETokenizer(vocab_size=320, min_frequency=1)(iter(texts), cache_dir=str(tmp_path), fingerprint="other")
    assert len(list((tmp_path / "tokenizers").glob("bpe-*.json"))) == 2  # another corpus, another entry


def test_tokenizer_state_round_trips():
    tok = ByteTokenizer()()
    back = tokenizer_from_state(tokenizer_state(tok))
    assert back(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert (back.pad_token_id, back.bos_token_id, back.eos_token_id, back.mask_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id)


# -- sources and the DataModule -------------------------------------------------------------------
def test_embedded_corpus_loads_offline(tmp_path):
    dd, fingerprint = EmbeddedSource().load(seed=0, cache_dir=str(tmp_path))
    assert len(dd["train"]) > 1000 and len(dd["validation"]) > 50
    assert any("def " in t for t in list(dd["train"]["text"])[:500]) and fingerprint


def test_datamodule_batches_are_packed_rows(corpus, tmp_path):
    dm = TextDataModule(source={"name": "text", "path": str(corpus)}, tokenizer={"name": "byte"},
                        seq_len=32, batch_size=4, cache_dir=str(tmp_path))
    tok = dm.load()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ids, seg = batch["input_ids"], batch["segment_ids"]
    assert ids.shape == seg.shape == (4, 32) and ids.dtype == torch.long
    starts = torch.zeros_like(seg, dtype=torch.bool)
    starts[:, 1:] = (seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] > 0)
    assert torch.all(ids[starts] == tok.bos_token_id)  # every document after the first in a row starts with BOS
    assert torch.all(ids[seg == 0] == tok.pad_token_id)
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape[1] == 32
    # the stream is a function of the seed only: a second DataModule sees the same first batch
    dm2 = TextDataModule(source={"name": "text", "path": str(corpus)}, tokenizer={"name": "byte"},
                         seq_len=32, batch_size=4, cache_dir=str(tmp_path))
    dm2.setup("fit")
    assert torch.equal(next(iter(dm2.train_dataloader()))["input_ids"], ids)


def test_train_tokens_keeps_a_prefix_of_the_train_rows_and_all_validation(corpus, tmp_path):
    def module(**kw):
        dm = TextDataModule(source={"name": "text", "path": str(corpus)}, tokenizer={"name": "byte"},
                            seq_len=32, batch_size=2, cache_dir=str(tmp_path), **kw)
        dm.setup("fit")
        return dm

    full, small = module(), module(train_tokens=100)
    assert len(full.splits["train"]) > 3 and len(small.splits["train"]) == 3  # whole rows: 100 // 32
    assert torch.equal(small.splits["train"][:]["input_ids"], full.splits["train"][:3]["input_ids"])
    assert torch.equal(small.splits["validation"][:]["input_ids"], full.splits["validation"][:]["input_ids"])
    with pytest.raises(Exception, match="data.train_tokens=8"):
        module(train_tokens=8)


def test_text_that_spells_special_tokens_stays_text(tmp_path):
    """A corpus quoting "[MASK]" must not put the mask id into x0 (its SUBS loss would be infinite)."""
    path = tmp_path / "specials.txt"
    path.write_text("\n\n".join(f"Paragraph {i} writes [MASK] and [EOS] and [PAD] literally." for i in range(40)))
    dm = TextDataModule(source={"name": "text", "path": str(path)}, tokenizer={"name": "byte"},
                        seq_len=32, batch_size=4, cache_dir=str(tmp_path))
    tok = dm.load()
    dm.setup("fit")
    ids = torch.cat([row["input_ids"] for row in dm.splits["train"]])
    assert not (ids == tok.mask_token_id).any()
    docs = len(dm.raw["train"])
    assert int((ids == tok.eos_token_id).sum()) == docs  # only the EOS the DataModule appends
