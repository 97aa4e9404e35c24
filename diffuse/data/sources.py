"""Where raw text comes from. Each source returns a `datasets.DatasetDict` with a `text` column
and `train` / `validation` splits; the DataModule does the rest (tokenize, pack) the same way for all.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import re
from pathlib import Path

import datasets

from diffuse.errors import DiffuseError
from diffuse.registry import DATASETS

log = logging.getLogger("diffuse")


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DiffuseError(f"data.val_fraction={val_fraction} must lie in (0, 1)")


# Bump when the way text is cut into documents changes: tokenizer and prepared-data caches keyed on it are rebuilt.
# 2: a whitespace-only line separates paragraphs (WikiText's blank lines hold a space).
DOCUMENTS = 2


def _nonblank(text: str) -> bool:
    """The one blank test: a document (loaded, streamed or from the hub) that is only whitespace is dropped, and
    a line that is only whitespace separates paragraphs."""
    return bool(text.strip())


# a line holding whitespace and nothing else; an empty line is already a cut of datasets' paragraph split
_WHITESPACE_LINE = re.compile(r"^[^\S\n]+$", re.M)


def paragraphs(text: str) -> list[str]:
    """The paragraphs of `text` (one of datasets' "\\n\\n"-separated pieces): runs of lines separated by blank
    lines, empty or whitespace-only (WikiText's separators hold a space). A text without a whitespace-only line
    comes back as it is (unless blank), so corpora with empty separators keep their documents exactly."""
    if not _WHITESPACE_LINE.search(text):
        return [text] if _nonblank(text) else []
    out, lines = [], []
    for line in text.split("\n"):
        if _nonblank(line):
            lines.append(line)
        elif lines:
            out.append("\n".join(lines))
            lines = []
    if lines:
        out.append("\n".join(lines))
    return out


def _paragraph_batch(batch: dict) -> dict:
    return {"text": [p for text in batch["text"] for p in paragraphs(text)]}


def _nonblank_batch(batch: dict) -> list[bool]:
    return [_nonblank(t) for t in batch["text"]]


def _has_whitespace_lines(ds: datasets.Dataset, batch: int = 1000) -> bool:
    return any(_WHITESPACE_LINE.search(t) for rows in ds.iter(batch_size=batch) for t in rows["text"])


def _split(ds: datasets.Dataset, val_fraction: float, seed: int) -> datasets.DatasetDict:
    _check_val_fraction(val_fraction)
    if len(ds) < 2:
        raise DiffuseError(f"data has {len(ds)} document(s); need at least 2 to split train/validation")
    parts = ds.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return datasets.DatasetDict(train=parts["train"], validation=parts["test"])


# In a folder, the files read as text: these suffixes (any case) and files with none. A file named
# directly is always read. Hidden files and anything under a hidden folder (.git/, .ipynb_checkpoints/)
# are skipped; what was read and skipped is logged.
TEXT_SUFFIXES = ("", ".txt", ".text", ".md", ".rst", ".raw", ".tokens")


def _folder_files(folder: Path, suffixes: tuple[str, ...], kind: str, report: bool = True) -> list[Path]:
    found, hidden, other = [], 0, []
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            hidden += 1
        elif f.suffix.lower() in suffixes:
            found.append(f)
        else:
            other.append(str(rel))
    skipped = ([f"{hidden} hidden"] if hidden else []) + (
        [f"{len(other)} not {kind} ({', '.join(other[:3])}{', …' if len(other) > 3 else ''})"] if other else [])
    note = f" (skipped: {'; '.join(skipped)})" if skipped else ""
    if not found:
        wanted = ", ".join(s or "no suffix" for s in suffixes)
        raise DiffuseError(f"data.path={folder} is a folder with no {kind} files ({wanted}){note}")
    if report:  # once, when the files are read (a fingerprint lists them without reading)
        log.info("data.path=%s: %d %s file(s) read%s", folder, len(found), kind, note)
    return found


def _files(path, suffixes: tuple[str, ...] = TEXT_SUFFIXES, kind: str = "text", check: bool = True) -> list[Path]:
    """Expand a file, folder or list of them; fail with the culprit's name if missing, or (with `check`, before
    reading) empty or not UTF-8. In a folder only `suffixes` are read, hidden paths skipped (see TEXT_SUFFIXES)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    if not paths:
        raise DiffuseError("data.path is empty: give a text file or a folder (data.path=/path/to/text)")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += _folder_files(p, suffixes, kind, report=check)
        elif p.is_file():
            files.append(p)
        else:
            raise DiffuseError(f"data.path={p} does not exist")
    if check:
        for f in files:
            _check_utf8(f)
    return files


def _check_utf8(f: Path, block: int = 1 << 24) -> None:
    """Read in blocks (a corpus larger than RAM is fine): not empty, and UTF-8 throughout."""
    decoder, offset, blank = codecs.getincrementaldecoder("utf-8")(), 0, True
    with open(f, "rb") as fh:
        while chunk := fh.read(block):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise DiffuseError(f"data file {f} is not UTF-8 (byte {offset + err.start})") from None
            blank = blank and not chunk.strip()
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DiffuseError(f"data file {f} is not UTF-8 (it ends inside a character)") from None
    if blank:
        raise DiffuseError(f"data file {f} is empty")


def _load_text(files: list[Path], sample_by: str, cache_dir: str) -> datasets.Dataset:
    # datasets writes Arrow files and memory-maps them (its cache reuses them next time): never all in RAM. They
    # are a copy of the corpus, so they live with diffuse's other caches, not in the home folder's HF cache.
    ds = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by=sample_by, split="train",
                               cache_dir=str(Path(cache_dir) / "datasets"),
                               num_proc=min(len(files), os.cpu_count() or 1) if len(files) > 1 else None)
    if sample_by == "paragraph" and _has_whitespace_lines(ds):  # else no new Arrow copy: blanks are filtered out
        return ds.map(_paragraph_batch, batched=True, remove_columns=ds.column_names, desc="paragraphs")
    return ds.filter(_nonblank_batch, batched=True)


def fingerprint_files(files: list[Path]) -> str:
    """Each file's path, size and modification time: an edited file gets a new fingerprint (tokenizer and
    prepared-data caches are keyed on it)."""
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


@DATASETS.register("text")
class TextSource:
    """Local text files or folders through `datasets.load_dataset("text")`.

    `sample_by`: what one document is — `paragraph` (separated by blank lines, empty or whitespace-only: see
    `paragraphs`), `line` or `document` (a whole file); whitespace-only documents are dropped. `val_path` gives
    an explicit validation set; otherwise a seeded split.
    """

    def __init__(self, path=None, val_path=None, sample_by: str = "paragraph", val_fraction: float = 0.05):
        if path is None:
            raise DiffuseError("data=text needs data.path=/path/to/file_or_folder")
        self.path, self.val_path = path, val_path
        self.sample_by, self.val_fraction = sample_by, val_fraction

    def fingerprint(self, cache_dir: str) -> str:
        """The files' path, size and modification time, read without opening them (the prepared-data cache is
        found from this before any text is loaded)."""
        files = _files(self.path, check=False)
        if self.val_path is not None:
            files += _files(self.val_path, check=False)
        return fingerprint_files(files)

    def load(self, seed: int, cache_dir: str) -> tuple[datasets.DatasetDict, str]:
        files = _files(self.path)
        train = _load_text(files, self.sample_by, cache_dir)
        if self.val_path is None:
            return _split(train, self.val_fraction, seed), self.fingerprint(cache_dir)
        dd = datasets.DatasetDict(train=train, validation=_load_text(_files(self.val_path), self.sample_by, cache_dir))
        return dd, self.fingerprint(cache_dir)

    def check_text(self) -> None:
        """Each file is UTF-8 and not empty, or the one-line error names it (a stream, which reads the files
        unchecked, calls this when decoding fails)."""
        _files(self.path)
        if self.val_path is not None:
            _files(self.val_path)

    def stream(self, cache_dir: str) -> dict:
        """The files read as they are consumed (data.streaming): nothing is written to disk, nothing is read before
        training asks for it (text that is not UTF-8 fails there, in the same one line as check_text's)."""
        train = _stream_text(_files(self.path, check=False), self.sample_by)
        if self.val_path is None:
            return _split_stream(train, self.val_fraction)
        return {"train": train, "validation": _stream_text(_files(self.val_path, check=False), self.sample_by)}


def embedded_text() -> str:
    """The embedded corpus's text: CPython's documentation topics, one paragraph-separated file."""
    from pydoc_data.topics import topics  # local: a 0.5 MB module, read only for data=embedded

    return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"


@DATASETS.register("embedded")
class EmbeddedSource(TextSource):
    """The default corpus: CPython's own bundled documentation topics (`pydoc_data.topics`, ~465k
    characters of English prose and code). Ships with Python, so it needs no network and no files."""

    def __init__(self, val_fraction: float = 0.05):
        super().__init__(path="<embedded>", sample_by="paragraph", val_fraction=val_fraction)

    def _materialise(self, cache_dir: str) -> None:
        text = embedded_text()
        out = Path(cache_dir) / "embedded" / "pydoc_topics.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.exists() or out.read_text() != text:
            out.write_text(text)
        self.path = str(out)

    def fingerprint(self, cache_dir: str) -> str:
        self._materialise(cache_dir)
        return super().fingerprint(cache_dir)

    def load(self, seed: int, cache_dir: str):
        self._materialise(cache_dir)
        return super().load(seed, cache_dir)

    def stream(self, cache_dir: str) -> dict:
        self._materialise(cache_dir)
        return super().stream(cache_dir)


def _split_stream(stream: datasets.IterableDataset, val_fraction: float) -> dict:
    """A stream has no length to split by: every k-th document (k = 1/val_fraction) is held out."""
    _check_val_fraction(val_fraction)
    every = max(2, round(1 / val_fraction))
    return {"train": stream.filter(lambda _, i: i % every != 0, with_indices=True),
            "validation": stream.filter(lambda _, i: i % every == 0, with_indices=True)}


def _stream_text(files: list[Path], sample_by: str) -> datasets.IterableDataset:
    ds = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by=sample_by, split="train",
                               streaming=True)
    if sample_by == "paragraph":  # the same documents as loaded: split at whitespace-only lines, blanks dropped
        return ds.map(_paragraph_batch, batched=True, remove_columns=["text"])
    return ds.filter(lambda row: _nonblank(row["text"]))


@DATASETS.register("hub")
class HubSource:
    """Any Hugging Face hub dataset by name (`data.hub_name`, `data.config`), its `text_column` as the text.
    Without a validation split, a seeded `val_fraction` of train is held out. Offline it fails at once and
    names the local alternative; `data.streaming=true` reads it as it trains (corpora larger than the disk)."""

    def __init__(self, hub_name: str | None = None, config: str | None = None, text_column: str = "text",
                 train_split: str = "train", val_split: str | None = "validation", val_fraction: float = 0.05):
        if not hub_name:
            raise DiffuseError("data=hub needs data.hub_name=<owner/dataset> (offline: data=text data.path=<file>)")
        self.hub_name, self.config, self.text_column = hub_name, config, text_column
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction

    def fingerprint(self, cache_dir: str) -> str:
        return f"{self.hub_name}/{self.config}"

    def _open(self, streaming: bool):
        try:
            dd = datasets.load_dataset(self.hub_name, self.config, streaming=streaming)
        except Exception as err:  # offline, no cache, hub down: all mean the same to the user
            raise DiffuseError(
                f"data.hub_name={self.hub_name} (config {self.config}) could not be loaded from the hub "
                f"({type(err).__name__}); offline, use data=text data.path=<file or folder>, e.g. "
                "data=text data.path=../shared/data/wikitext-2/valid.txt"
            ) from None
        for split in (self.train_split, self.val_split):
            if split is not None and split not in dd:
                raise DiffuseError(f"data.hub_name={self.hub_name} has no split {split!r} (it has {', '.join(dd)})")
        columns = dd[self.train_split].column_names
        if columns is not None and self.text_column not in columns:
            raise DiffuseError(f"data.text_column={self.text_column!r} is not a column of {self.hub_name} "
                               f"(it has {', '.join(columns)})")
        return {name: dd[name].select_columns([self.text_column]).rename_column(self.text_column, "text")
                .filter(lambda row: _nonblank(row["text"]))
                for name in (self.train_split, self.val_split) if name is not None}

    def load(self, seed: int, cache_dir: str):
        parts = self._open(streaming=False)
        if self.val_split is None:
            return _split(parts[self.train_split], self.val_fraction, seed), self.fingerprint(cache_dir)
        dd = datasets.DatasetDict(train=parts[self.train_split], validation=parts[self.val_split])
        return dd, self.fingerprint(cache_dir)

    def stream(self, cache_dir: str) -> dict:
        parts = self._open(streaming=True)
        if self.val_split is None:
            return _split_stream(parts[self.train_split], self.val_fraction)
        return {"train": parts[self.train_split], "validation": parts[self.val_split]}


@DATASETS.register("wikitext2")
class WikiText2Source(HubSource):
    """WikiText-2 (raw) from the Hugging Face hub: data=hub with its name filled in."""

    def __init__(self, hub_name: str = "Salesforce/wikitext", config: str = "wikitext-2-raw-v1",
                 text_column: str = "text", train_split: str = "train", val_split: str | None = "validation",
                 val_fraction: float = 0.05):
        super().__init__(hub_name, config, text_column, train_split, val_split, val_fraction)
