"""Data input that used to go wrong quietly or with a traceback (issue 24): WikiText's whitespace-only separator
lines, long documents under data.pack=false, a file given to evaluate scored in part, an unusable cache folder,
a non-UTF-8 file streamed, and the data-scale benchmark without ../shared."""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, call_main, error_lines, tiny_args
from diffuse.data.datamodule import TextDataModule
from diffuse.data.sources import TextSource, paragraphs

TITLES = ("Homarus gammarus", "Description", "Ecology", "Fishery")


def wikitext_like(path: Path, n: int = 40) -> tuple[Path, list[str]]:
    """WikiText-2's raw layout: ` = Title = ` headings, every line of text followed by a line holding one space,
    no empty line anywhere. Its n documents (headings and paragraphs) as the paragraph split must find them."""
    docs = []
    for i in range(n):
        docs.append(f" = {TITLES[i % len(TITLES)]} {i} = " if i % 5 == 0 else
                    f" The lobster number {i} , known as <unk> , lives in the sea at depth {i * 7} m .")
    path.write_text(" \n" + "".join(f"{d}\n \n" for d in docs), encoding="utf-8")
    return path, [d for d in docs]


def assert_one_line_error(result, *culprits: str) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


# -- 1. a whitespace-only line separates paragraphs -----------------------------------------------
def test_paragraphs_are_cut_at_whitespace_only_lines():
    assert paragraphs(" = A = \n \n First line .\n \t\n\n Second\n still second\n   \n") == [
        " = A = ", " First line .", " Second\n still second"]
    assert paragraphs("no blank line\nhere") == ["no blank line\nhere"]  # unchanged: no whitespace-only line
    assert paragraphs("\nleading newline kept") == ["\nleading newline kept"]  # as datasets cut it before
    assert paragraphs(" \n\t\n") == [] and paragraphs("") == []


def test_a_wikitext_like_file_has_one_document_per_paragraph_loaded_or_streamed(tmp_path):
    path, docs = wikitext_like(tmp_path / "valid.txt")
    source = TextSource(path=str(path), val_path=str(path))
    loaded, _ = source.load(seed=0, cache_dir=str(tmp_path / "cache"))
    assert list(loaded["validation"]["text"]) == docs  # was: the whole file, one document
    streamed = [d["text"] for d in source.stream(str(tmp_path / "cache"))["validation"]]
    assert streamed == docs
    split, _ = TextSource(path=str(path), val_fraction=0.1).load(seed=0, cache_dir=str(tmp_path / "cache"))
    assert sorted(list(split["train"]["text"]) + list(split["validation"]["text"])) == sorted(docs)
    assert len(split["validation"]) == 4


def test_training_on_a_wikitext_like_file_runs(tmp_path):
    path, _ = wikitext_like(tmp_path / "valid.txt")
    result = call_main("diffuse.train", *tiny_args(path, tmp_path / "run"))  # was: "data has 1 document(s)"
    assert result.returncode == 0, result
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


# -- 2. data.pack=false: a long text document fills several rows; SFT truncation is said -------------
def text_module(path, tmp_path, **kw):
    dm = TextDataModule(source={"name": "text", "path": str(path), "val_path": str(path)}, tokenizer={"name": "byte"},
                        seq_len=16, batch_size=2, pack=False, cache_dir=str(tmp_path / "cache"), **kw)
    dm.load()
    dm.setup()
    return dm


@pytest.mark.parametrize("prepared", [True, False])
def test_unpacked_long_documents_continue_in_the_next_rows(tmp_path, prepared):
    path = tmp_path / "long.txt"
    docs = ["short one", "a much longer paragraph that needs three rows of sixteen", "x"]
    path.write_text("\n\n".join(docs))  # no final newline: datasets keeps it in the last paragraph
    dm = text_module(path, tmp_path, prepared=prepared)
    rows = dm.splits["validation"]
    ids = torch.stack([rows[i]["input_ids"] for i in range(len(rows))])
    seg = torch.stack([rows[i]["segment_ids"] for i in range(len(rows))])
    lengths = [len(d.encode()) + 2 for d in docs]  # byte tokens + BOS + EOS
    assert len(rows) == sum(math.ceil(n / 16) for n in lengths)  # was: one row per document, truncated
    assert int((seg > 0).sum()) == sum(lengths)  # every token is in a row
    assert set(seg.unique().tolist()) <= {0, 1}  # still one document (piece) per row
    text = dm.tokenizer.decode(ids[seg > 0].tolist(), skip_special_tokens=True)
    assert text == "".join(docs)


def test_a_wikitext_like_file_unpacked_is_many_rows(tmp_path):
    path, docs = wikitext_like(tmp_path / "valid.txt")
    rows = text_module(path, tmp_path).splits["validation"]
    assert len(rows) >= len(docs)  # was: 1 row


@pytest.mark.parametrize("prepared", [True, False])
def test_truncated_sft_samples_are_counted_in_one_log_line(tmp_path, caplog, prepared):
    caplog.set_level(logging.INFO, logger="diffuse")
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": "Q: ", "completion": "short"}, {"prompt": "Q: ", "completion": "y" * 40}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 10))

    def build():
        dm = TextDataModule(source={"name": "sft", "path": str(path), "val_path": str(path)},
                            tokenizer={"name": "byte"}, seq_len=16, batch_size=2, pack=False, prepared=prepared,
                            cache_dir=str(tmp_path / "cache"))
        dm.load()
        dm.setup()
        return dm

    dm = build()
    assert set(dm.splits["validation"][0]) == {"input_ids", "segment_ids", "prompt_mask"}  # the count is no column
    dropped = (2 + 3 + 40) - 16  # BOS + prompt + answer + EOS past seq_len
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data split")]
    want = f"10 of 20 documents longer than data.seq_len=16 were truncated with data.pack=false ({10 * dropped} tokens"
    assert [n for n in notes if "'validation'" in n] and all(want in n for n in notes), notes
    if prepared:  # said again when the prepared rows are reused
        caplog.clear()
        build()
        assert any(want in r.getMessage() for r in caplog.records), caplog.records


# -- 3. a file given to evaluate is evaluated whole -----------------------------------------------
def test_evaluate_scores_every_document_of_the_file_it_is_given(tmp_path):
    from evaluation_runs import ckpt

    from diffuse.evaluation.runner import eval_data_config, heldout, load_checkpoint
    from diffuse.run.build import as_dict

    path, docs = wikitext_like(tmp_path / "valid.txt", n=60)
    c = load_checkpoint(ckpt("masked_discrete"), "cpu")
    given = {"name": "text", "path": str(path), "val_path": None, "sample_by": "paragraph", "val_fraction": 0.05}
    cfg = eval_data_config(as_dict(c.cfg.data), given)
    dm = heldout(c, cfg, seed=0, cache_dir=str(tmp_path / "cache"))
    assert list(dm.documents("validation")) == docs  # was: a 5% split, 3 of them
    assert eval_data_config({}, given, {"val_fraction"})["val_path"] is None  # a split asked for stays one

    result = call_main("diffuse.evaluate", f"ckpt={ckpt('masked_discrete')}", "data=text", f"data.path={path}",
                       "limit_batches=null", "num_samples=0", "t_samples=1", "progress=false",
                       f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 0, result
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    rows = len(dm.splits["validation"])
    assert report["data_description"].startswith(f"{rows} held-out rows")
    assert report["likelihood"]["val/batches"] == math.ceil(rows / dm.eval_batch_size)


# -- 4. one-line errors: an unusable cache folder, a non-UTF-8 file streamed ------------------------
def test_a_cache_dir_that_is_a_file_is_one_line_naming_it(tmp_path, corpus, monkeypatch):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("not a folder\n")
    monkeypatch.setenv("DIFFUSE_CACHE", str(blocker))  # paths.cache_dir's default reads it
    line = assert_one_line_error(call_main("diffuse.train", *tiny_args(corpus, tmp_path / "run")),
                                 f"paths.cache_dir={blocker}", "DIFFUSE_CACHE", "is a file")
    under = blocker / "sub"
    assert_one_line_error(call_main("diffuse.train", *tiny_args(corpus, tmp_path / "run2", f"paths.cache_dir={under}")),
                          f"paths.cache_dir={under}", "cannot be created")
    assert line


def test_an_unwritable_cache_dir_is_one_line_naming_it(tmp_path, corpus, monkeypatch):
    """Root ignores file modes, so the refusal is the file system's answer, played by Path.mkdir."""
    cache = tmp_path / "readonly-cache"
    cache.mkdir()
    mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self != cache and self.is_relative_to(cache):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert_one_line_error(call_main("diffuse.train", *tiny_args(corpus, tmp_path / "run", f"paths.cache_dir={cache}")),
                          f"paths.cache_dir={cache}", "Permission denied")


def test_a_streamed_non_utf8_file_is_the_prepared_paths_one_line(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me\n\nsecond paragraph\n\nthird one\n".encode("latin-1"))
    prepared = assert_one_line_error(call_main("diffuse.train", *tiny_args(latin1, tmp_path / "a")), "latin1.txt")
    for extra in ([], ["tokenizer=bpe", "tokenizer.vocab_size=300"]):  # the rows' stream, and BPE training's
        streamed = assert_one_line_error(
            call_main("diffuse.train", *tiny_args(latin1, tmp_path / "b", "data.streaming=true", *extra)))
        assert streamed == prepared == f"error: data file {latin1} is not UTF-8 (byte 3)"


# -- 5. the data-scale benchmark runs without ../shared ---------------------------------------------
BENCH = REPO / "experiments" / "bench" / "data_scale.py"


def test_data_scale_falls_back_to_the_embedded_corpus_without_shared_data(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("data_scale", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "DATA", tmp_path / "no-shared")
    monkeypatch.setattr(bench, "SOURCES", [tmp_path / "no-shared" / "input.txt"])
    files, text = bench.source_texts("auto", tmp_path)
    assert files == [tmp_path / "embedded.txt"] and "embedded" in text and "absent" in text
    assert bench.build_corpus(tmp_path / "corpus", 10_000, 4_000, 0, files) >= 10_000


def test_data_scale_runs_at_a_tiny_size_on_the_embedded_corpus(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--mb", "0.05", "--steps", "1", "--text", "embedded",
                           "--workdir", str(tmp_path), "--out", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== text: diffuse's embedded corpus" in proc.stdout
    report = json.loads((tmp_path / "out" / "data_scale.json").read_text())
    assert "embedded corpus" in report["text"] and [p["name"] for p in report["phases"]] == [
        "prepare", "prepare again", "train big", "train tiny"]
    assert report["phases"][1]["reused"]
