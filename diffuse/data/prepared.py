"""The prepared-data cache: a split's tokenized, packed rows written once, then memory-mapped by every run.

Layout: `<cache_dir>/prepared/<key>/<split>/` holds one `<column>.npy` [rows, seq_len] per column
(`input_ids` in uint16 when the vocabulary fits, else uint32; `segment_ids` and `prompt_mask` in the
smallest unsigned type that fits) and `meta.json` (rows, seq_len, dtypes, vocabulary, the key's parts).
The key hashes everything that shapes the rows (RowMaker.cache_parts in diffuse/data/rows.py); change any of it
and a new folder is written. A split is written into `.<split>.<host>-<pid>.tmp`, fsynced and renamed into place, so
a killed preparation leaves no half cache (the next writer on that host removes its temp folder);
`meta.json` inside the renamed folder is the marker the other ranks wait for. Documents are tokenized
CHUNK at a time (in forked processes, data.num_proc) and appended to the files in order, so memory is bounded
by a few chunks, not the corpus.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing as mp
import operator
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from datasets.utils.tqdm import tqdm
from torch.utils.data import Dataset

from diffuse import __version__
from diffuse.core.io import fsync_dir
from diffuse.core.ranks import is_local_rank_zero
from diffuse.data.packing import DROPPED, add_counts, truncation_counts, truncation_note
from diffuse.errors import DiffuseError

log = logging.getLogger("diffuse")

LAYOUT = 2  # bump when the files or the way rows are cut change: older caches are then not reused
# 2: whitespace-only lines separate paragraphs; data.pack=false cuts a long text document into several rows
CHUNK = 2000  # documents per tokenizer call; the in-memory path packs the same batches, so rows agree
META = "meta.json"
WAIT_S = 4 * 3600.0  # how long a rank waits for local rank 0 to prepare a split


def cache_key(parts: dict) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# errors that say the cache folder cannot take files (as opposed to a bug or a missing input)
CACHE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC, errno.EDQUOT}


def cache_dir_error(cache_dir, why: str) -> DiffuseError:
    env = os.environ.get("DIFFUSE_CACHE")
    origin = " (from DIFFUSE_CACHE)" if env and os.path.abspath(env) == os.path.abspath(cache_dir) else ""
    return DiffuseError(f"paths.cache_dir={cache_dir}{origin} is not a usable cache folder: {why}; set paths.cache_dir= "
                        "(or the DIFFUSE_CACHE environment variable) to a writable folder")


def check_cache_dir(cache_dir) -> None:
    """The cache folder exists (made if need be) and is a folder; a run that only reads a prepared cache may find
    it read-only, so writing is checked where it happens (cache_errors)."""
    root = Path(cache_dir)
    if root.exists() and not root.is_dir():
        raise cache_dir_error(cache_dir, "it is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise cache_dir_error(cache_dir, f"it cannot be created ({err.strerror})") from None


@contextmanager
def cache_errors(cache_dir):
    """An OSError on a path inside the cache folder (unwritable, read-only, full) becomes the one-line error."""
    try:
        yield
    except OSError as err:
        name = err.filename
        inside = isinstance(name, str) and Path(os.path.abspath(name)).is_relative_to(os.path.abspath(cache_dir))
        if err.errno in CACHE_ERRNOS and inside:
            raise cache_dir_error(cache_dir, f"{err.strerror} ({name})") from None
        raise


def is_writer() -> bool:
    """Local rank 0 of each node prepares (a node-local cache_dir works too); torch.distributed is not needed."""
    return is_local_rank_zero()


def uint_for(largest: int) -> np.dtype:
    return np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32) if largest <= np.iinfo(t).max))


class PreparedRows(Dataset):
    """A prepared split: row i as {column: LongTensor[seq_len]}, read from the memory-mapped files
    (a slice gives stacked rows). `limit` keeps the first rows (data.train_tokens)."""

    def __init__(self, folder: Path, limit: int | None = None):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META).read_text())
        self.rows = self.meta["rows"] if limit is None else min(limit, self.meta["rows"])
        self._arrays = None

    def arrays(self) -> dict[str, np.ndarray]:
        # opened on first use: DataLoader workers map the files themselves instead of receiving pickled copies
        if self._arrays is None:
            self._arrays = {c: np.load(self.folder / f"{c}.npy", mmap_mode="r") for c in self.meta["dtypes"]}
        return self._arrays

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = slice(*index.indices(self.rows))
        else:
            index = operator.index(index)
            if not -self.rows <= index < self.rows:
                raise IndexError(f"row {index} of {self.rows}")
            index %= self.rows
        return {c: torch.from_numpy(a[index].astype(np.int64)) for c, a in self.arrays().items()}


def is_prepared(folder: Path) -> bool:
    return (folder / META).is_file()


def open_split(root: Path, split: str, documents: Callable[[], object], encode: Callable[[dict], dict], meta: dict,
               limit: int | None = None, wait_s: float = WAIT_S, num_proc: int | None = None) -> PreparedRows:
    """The prepared rows of `split` under `root`: reused if there, else written by local rank 0 (the other
    ranks wait for its meta.json). `documents()` gives the split's documents (called only when writing),
    `encode` turns a batch of them into rows; `meta` is recorded."""
    folder = root / split
    if is_prepared(folder):
        log.info("prepared data: reused %s", folder)
    elif is_writer():
        tic = time.perf_counter()
        rows = write_split(folder, documents(), encode, meta, num_proc)
        size = sum(f.stat().st_size for f in folder.iterdir())
        log.info("prepared data: wrote %s (%d rows, %.1f MB, %.1f s)", folder, rows, size / 1e6,
                 time.perf_counter() - tic)
    else:
        wait_for(folder / META, wait_s)
    prepared = PreparedRows(folder, limit)
    note = truncation_note(prepared.meta.get("truncated", {}), prepared.meta["seq_len"], split)
    if note:  # said on every run that trains on these rows, not only the one that wrote them
        log.warning(note)
    return prepared


def wait_for(marker: Path, timeout: float, poll: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.is_file():
        if time.monotonic() > deadline:
            raise DiffuseError(f"prepared data: {marker} did not appear within {timeout:.0f} s (local rank 0 writes "
                               "it; run python -m diffuse.prepare with the same overrides first)")
        time.sleep(min(poll, timeout))


class _NpyAppender:
    """Rows appended to a .npy file; the header is rewritten with the final row count at close (numpy pads
    headers so their length does not depend on the first axis' size)."""

    def __init__(self, path: Path, dtype: np.dtype, width: int):
        self.path, self.dtype, self.width, self.rows = path, dtype, width, 0
        self.file = open(path, "wb")
        self._header()
        self.start = self.file.tell()

    def _header(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, self.width)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, rows: np.ndarray) -> None:
        if rows.size and (rows.min() < 0 or rows.max() > np.iinfo(self.dtype).max):
            raise DiffuseError(f"prepared data: {self.path.stem} value {rows.max()} does not fit {self.dtype}")
        np.ascontiguousarray(rows, dtype=self.dtype).tofile(self.file)
        self.rows += len(rows)

    def close(self) -> None:
        self.file.seek(0)
        self._header()
        assert self.file.tell() == self.start, f"{self.path}: the .npy header changed length"
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


_JOB: tuple = ()  # (documents, encode) for forked workers: inherited, never pickled


def _encode_chunk(start: int) -> dict[str, np.ndarray]:
    documents, encode = _JOB
    return encode(documents[start:start + CHUNK])


def _encoded_chunks(documents, encode, num_proc: int | None):
    """encode(chunk) for each CHUNK of documents, in order; with several chunks, in `num_proc` forked processes
    (all cores when None), at most two chunks per process in flight so memory stays bounded. Order is kept, so
    the rows do not depend on the number of processes; a worker's exception (or its death) is raised here."""
    global _JOB
    starts = range(0, len(documents), CHUNK)
    procs = min(num_proc or os.cpu_count() or 1, len(starts))
    if procs <= 1 or "fork" not in mp.get_all_start_methods():
        yield from (encode(documents[s:s + CHUNK]) for s in starts)
        return
    _JOB = (documents, encode)
    pool = ProcessPoolExecutor(procs, mp_context=mp.get_context("fork"))
    try:
        pending: deque = deque()
        for start in starts:
            pending.append(pool.submit(_encode_chunk, start))
            if len(pending) >= 2 * procs:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _JOB = ()


def write_split(folder: Path, documents, encode: Callable[[dict], dict], meta: dict, num_proc: int | None = None) -> int:
    """Tokenize and pack `documents` (a datasets.Dataset) CHUNK at a time into `folder`, atomically; the rows."""
    remove_stale_temps(folder)
    tmp = folder.with_name(f".{folder.name}.{_owner()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seq_len = meta["seq_len"]
    dtypes = {"input_ids": np.dtype(np.uint16 if meta["vocab_size"] <= 65535 else np.uint32),
              "segment_ids": uint_for(seq_len), "prompt_mask": uint_for(1)}
    files: dict[str, _NpyAppender] = {}
    truncated: dict[str, int] = {}
    try:
        with tqdm(total=len(documents), desc=f"prepare {folder.name}", unit=" docs") as bar:
            for start, encoded in zip(range(0, len(documents), CHUNK), _encoded_chunks(documents, encode, num_proc)):
                if DROPPED in encoded:
                    truncated = add_counts(truncated, truncation_counts(encoded.pop(DROPPED)))
                for name, rows in encoded.items():
                    if name not in files:
                        files[name] = _NpyAppender(tmp / f"{name}.npy", dtypes[name], seq_len)
                    files[name].append(rows)
                bar.update(min(CHUNK, len(documents) - start))
        for f in files.values():
            f.close()
        rows = files["input_ids"].rows if files else 0
        if rows == 0:
            raise DiffuseError(f"data split '{folder.name}' is empty after tokenization")
        record = {**meta, "rows": rows, "dtypes": {n: f.dtype.name for n, f in files.items()},
                  "layout": LAYOUT, "diffuse": __version__, **({"truncated": truncated} if truncated else {})}
        with open(tmp / META, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / META).is_file():
                raise
            log.info("prepared data: %s was written meanwhile by another process; using it", folder)
        fsync_dir(folder.parent)
        return rows
    finally:
        for f in files.values():
            f.file.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _owner() -> str:
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def remove_stale_temps(folder: Path) -> None:
    """This host's temp folders whose process is gone (killed mid-write) are removed; live ones, and other
    hosts' (a shared cache_dir), are kept. Readers never look inside a temp folder."""
    host = _owner().rsplit("-", 1)[0]
    for tmp in folder.parent.glob(f".{folder.name}.{host}-*.tmp"):
        pid = tmp.name[: -len(".tmp")].rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
