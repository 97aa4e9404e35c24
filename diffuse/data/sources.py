"""Where raw text comes from. Each source returns a `datasets.DatasetDict` with a `text` column
and `train` / `validation` splits; the DataModule does the rest (tokenize, pack) the same way for all.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
from pathlib import Path

import datasets

from diffuse.errors import DiffuseError
from diffuse.registry import DATASETS

log = logging.getLogger("diffuse")


def _split(ds: datasets.Dataset, val_fraction: float, seed: int) -> datasets.DatasetDict:
    if not 0.0 < val_fraction < 1.0:
        raise DiffuseError(f"data.val_fraction={val_fraction} must lie in (0, 1)")
    if len(ds) < 2:
        raise DiffuseError(f"data has {len(ds)} document(s); need at least 2 to split train/validation")
    parts = ds.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return datasets.DatasetDict(train=parts["train"], validation=parts["test"])


# In a folder, the files read as text: these suffixes (any case) and files with none. A file named
# directly is always read. Hidden files and anything under a hidden folder (.git/, .ipynb_checkpoints/)
# are skipped; what was read and skipped is logged.
TEXT_SUFFIXES = ("", ".txt", ".text", ".md", ".rst", ".raw", ".tokens")


def _folder_files(folder: Path, suffixes: tuple[str, ...], kind: str) -> list[Path]:
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
            files += _folder_files(p, suffixes, kind)
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


def _load_text(files: list[Path], sample_by: str) -> datasets.Dataset:
    # datasets writes Arrow files and memory-maps them (its cache reuses them next time): never all in RAM
    ds = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by=sample_by, split="train",
                               num_proc=min(len(files), os.cpu_count() or 1) if len(files) > 1 else None)
    return ds.filter(lambda batch: [bool(t.strip()) for t in batch["text"]], batched=True)


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

    `sample_by`: what one document is — `paragraph` (blank-line separated), `line` or `document`
    (a whole file). `val_path` gives an explicit validation set; otherwise a seeded split.
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
        train = _load_text(files, self.sample_by)
        if self.val_path is None:
            return _split(train, self.val_fraction, seed), self.fingerprint(cache_dir)
        dd = datasets.DatasetDict(train=train, validation=_load_text(_files(self.val_path), self.sample_by))
        return dd, self.fingerprint(cache_dir)


@DATASETS.register("embedded")
class EmbeddedSource(TextSource):
    """The default corpus: CPython's own bundled documentation topics (`pydoc_data.topics`, ~465k
    characters of English prose and code). Ships with Python, so it needs no network and no files."""

    def __init__(self, val_fraction: float = 0.05):
        super().__init__(path="<embedded>", sample_by="paragraph", val_fraction=val_fraction)

    def _materialise(self, cache_dir: str) -> None:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"
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


@DATASETS.register("wikitext2")
class WikiText2Source:
    """WikiText-2 (raw) from the Hugging Face hub. Offline it fails fast and names the alternative."""

    def __init__(self, hub_name: str = "Salesforce/wikitext", config: str = "wikitext-2-raw-v1"):
        self.hub_name, self.config = hub_name, config

    def fingerprint(self, cache_dir: str) -> str:
        return f"{self.hub_name}/{self.config}"

    def load(self, seed: int, cache_dir: str):
        try:
            dd = datasets.load_dataset(self.hub_name, self.config)
        except Exception as err:  # offline, no cache, hub down: all mean the same to the user
            raise DiffuseError(
                f"data=wikitext2 could not load {self.hub_name}/{self.config} from the hub "
                f"({type(err).__name__}); offline, use data=text data.path=<file>, e.g. "
                "data=text data.path=../shared/data/wikitext-2/valid.txt"
            ) from None
        dd = dd.filter(lambda row: bool(row["text"].strip()))
        return datasets.DatasetDict(train=dd["train"], validation=dd["validation"]), self.fingerprint(cache_dir)
