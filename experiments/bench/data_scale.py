"""The prepared-data cache at scale: tokenizing a large corpus once, reusing it, and training on it in
bounded memory.

    python experiments/bench/data_scale.py --gb 2                    # the benchmark (byte tokenizer)
    python experiments/bench/data_scale.py --mb 30 --tokenizer bpe   # a quick check

Builds a synthetic corpus of the requested size in a fresh temp folder (`--workdir`, default /tmp): seeded,
shuffled repeats of the paragraphs of ../shared/data/tinyshakespeare/input.txt and
../shared/data/wikitext-2/{valid,test}.txt, streamed into 256 MB files. Without ../shared/data (or with
`--text embedded`) the paragraphs are those of diffuse's embedded corpus (CPython's documentation topics, written
to the temp folder at run time), which then also stands in for Tiny Shakespeare; the report says which text it used. Then runs, as subprocesses with a
fresh paths.cache_dir (and HF_DATASETS_CACHE) in that folder (the corpus's Arrow copy goes to <cache_dir>/datasets):

  prepare       python -m diffuse.prepare data=text data.path=<corpus> tokenizer=byte data.seq_len=256
  prepare again the same: must reuse the cache; its wall time is the second-run start-up
  train big     python -m diffuse.train, same data, a 64-wide 2-layer model, --steps steps
  train tiny    the same training on Tiny Shakespeare (or the embedded text) alone (prepared first, untimed): the
                memory reference

Each is timed (wall; "to train" = until the "[2/3] train" log line) and its memory sampled every 0.2 s
from /proc: the peak RSS and PSS summed over the process and all its descendants (forked tokenizer
workers share pages, so the RSS sum over-counts and PSS does not), besides wait4's ru_maxrss (the largest
single process). Targets: train-big / train-tiny peak tree RSS <= 1.5, second-run start-up <= 10 s.
Writes data_scale.md and data_scale.json next to this file (`--out`); deletes the workdir unless --keep.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import itertools
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
SOURCES = [DATA / "tinyshakespeare" / "input.txt", DATA / "wikitext-2" / "valid.txt", DATA / "wikitext-2" / "test.txt"]
ECHO = re.compile(r"prepared data:|^(train|validation): |\[[123]/3\]|done at step|Error|error:")
PAGE = os.sysconf("SC_PAGE_SIZE")
TARGET_RATIO, TARGET_STARTUP_S = 1.5, 10.0


def source_texts(choice: str, work: Path) -> tuple[list[Path], str]:
    """The files whose paragraphs make the corpus (the first is the tiny run's text), and what they are."""
    if choice == "shared" or (choice == "auto" and all(f.is_file() for f in SOURCES)):
        missing = [str(f) for f in SOURCES if not f.is_file()]
        if missing:
            sys.exit(f"--text shared: {', '.join(missing)} not found")
        return SOURCES, f"{DATA}: Tiny Shakespeare, WikiText-2 valid and test"
    from diffuse.data.sources import embedded_text

    path = work / "embedded.txt"
    path.write_text(embedded_text(), encoding="utf-8")
    why = "asked for" if choice == "embedded" else f"{DATA} is absent"
    return [path], f"diffuse's embedded corpus (CPython's documentation topics, {path.stat().st_size / 1e6:.2f} MB; {why})"


def build_corpus(folder: Path, target: int, file_bytes: int, seed: int, sources: list[Path] = SOURCES) -> int:
    """Shuffled passes over the source paragraphs, streamed into part-NNN.txt files of ~file_bytes; the bytes."""
    paras = []
    for f in sources:
        paras += [p.strip("\n").encode() + b"\n\n" for p in re.split(r"\n[ \t]*\n", f.read_text("utf-8")) if p.strip()]
    rng, written, index, out, in_file = random.Random(seed), 0, 0, None, 0
    folder.mkdir(parents=True)
    while written < target:
        rng.shuffle(paras)
        if written + sum(map(len, paras)) > target:  # the last pass: just enough paragraphs to reach the target
            paras = paras[:bisect.bisect_left(list(itertools.accumulate(map(len, paras))), target - written) + 1]
        block = b"".join(paras)
        if out is None or in_file >= file_bytes:
            if out:
                out.close()
            out, in_file, index = open(folder / f"part-{index:03d}.txt", "wb"), 0, index + 1
        out.write(block)
        written, in_file = written + len(block), in_file + len(block)
    out.close()
    return written


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def memory(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over pids; vanished processes count 0."""
    rss = pss = 0
    for pid in pids:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            pss += int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1)) * 1024
        except (OSError, AttributeError):
            pass
    return rss, pss


def run(name: str, args: list[str], log: Path, env: dict) -> dict:
    """Run `python -m <args>` from the repo root; wall time, peak tree RSS / PSS, ru_maxrss, time to train."""
    print(f"\n== {name}: python -m {' '.join(args)}", flush=True)
    marks: dict[str, float] = {}
    tic = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True, errors="replace",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def read():
        with open(log, "w") as out:
            for line in proc.stdout:
                out.write(line)
                if "[2/3] train" in line and "train" not in marks:
                    marks["train"] = time.perf_counter() - tic
                if "prepared data: reused" in line:
                    marks["reused"] = 1
                if ECHO.search(line):
                    print("   ", line.rstrip()[-200:], flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak_rss = peak_pss = 0
    while True:
        rss, pss = memory(process_tree(proc.pid))
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.2)
    wall = time.perf_counter() - tic
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    if proc.returncode:
        sys.exit(f"{name} failed (exit {proc.returncode}); its log: {log}\n" + "".join(log.read_text().splitlines(True)[-15:]))
    result = {"name": name, "wall_s": wall, "peak_tree_rss_mb": peak_rss / 1e6, "peak_tree_pss_mb": peak_pss / 1e6,
              "ru_maxrss_mb": usage.ru_maxrss * 1024 / 1e6, "to_train_s": marks.get("train"),
              "reused": "reused" in marks, "log": str(log)}
    print(f"   {wall:.1f} s, peak tree RSS {peak_rss / 1e6:.0f} MB (PSS {peak_pss / 1e6:.0f} MB), "
          f"ru_maxrss {result['ru_maxrss_mb']:.0f} MB", flush=True)
    return result


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def table(phases: list[dict]) -> str:
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    lines = ["| phase | wall s | to train s | text MB/s | peak tree RSS MB | peak tree PSS MB | ru_maxrss MB | reused |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for p in phases:
        lines.append(f"| {p['name']} | {p['wall_s']:.1f} | {fmt(p['to_train_s'], '.1f')} | {fmt(p.get('mb_per_s'), '.1f')} "
                     f"| {p['peak_tree_rss_mb']:.0f} | {p['peak_tree_pss_mb']:.0f} | {p['ru_maxrss_mb']:.0f} "
                     f"| {'yes' if p['reused'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--gb", type=float, default=2.0, help="corpus size in GB (1e9 bytes)")
    size.add_argument("--mb", type=float, help="corpus size in MB (1e6 bytes), for small runs")
    parser.add_argument("--file-mb", type=float, default=256.0, help="size of each corpus file")
    parser.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    parser.add_argument("--num-proc", type=int, help="passed as data.num_proc=N (default: the config's)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the two training runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", choices=["auto", "shared", "embedded"], default="auto",
                        help="the corpus's paragraphs: ../shared/data (shared), the embedded corpus, or auto: "
                             "shared when present, else embedded")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="a fresh data_scale-* folder is made here")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--keep", action="store_true", help="keep the corpus, caches and run dirs")
    args = parser.parse_args()
    target = int(args.mb * 1e6) if args.mb is not None else int(args.gb * 1e9)

    work = Path(tempfile.mkdtemp(prefix="data_scale-", dir=args.workdir))
    corpus, cache, logs = work / "corpus", work / "cache", work / "logs"
    logs.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "HF_DATASETS_CACHE": str(work / "hf_datasets")}
    try:
        sources, text = source_texts(args.text, work)
        print(f"== text: {text}", flush=True)
        print(f"== corpus: {target / 1e6:.0f} MB into {corpus}", flush=True)
        tic = time.perf_counter()
        corpus_bytes = build_corpus(corpus, target, int(args.file_mb * 1e6), args.seed, sources)
        build_s = time.perf_counter() - tic
        n_files = len(list(corpus.iterdir()))
        print(f"   {corpus_bytes / 1e6:.1f} MB in {n_files} file(s), {build_s:.1f} s", flush=True)

        data = ["data=text", "data.seq_len=256", f"tokenizer={args.tokenizer}", f"paths.cache_dir={cache}"]
        data += ["tokenizer.vocab_size=4096"] if args.tokenizer == "bpe" else []
        data += [f"data.num_proc={args.num_proc}"] if args.num_proc is not None else []
        train = ["model.d_model=64", "model.n_layers=2", f"trainer.max_steps={args.steps}",
                 f"trainer.val_check_interval={args.steps}", "trainer.limit_val_batches=2", "num_samples=0",
                 "callbacks.progress_bar=null"]
        big, tiny = [f"data.path={corpus}", *data], [f"data.path={sources[0]}", *data]

        phases = [run("prepare", ["diffuse.prepare", *big], logs / "prepare.log", env)]
        phases[0]["mb_per_s"] = corpus_bytes / 1e6 / phases[0]["wall_s"]
        # local text's Arrow copy lives in <cache_dir>/datasets (HF_DATASETS_CACHE only catches anything else)
        prepared_bytes, arrow_bytes = du(cache / "prepared"), du(cache / "datasets") + du(work / "hf_datasets")
        print(f"   prepared cache {prepared_bytes / 1e6:.1f} MB; datasets Arrow cache {arrow_bytes / 1e6:.1f} MB")
        phases.append(run("prepare again", ["diffuse.prepare", *big], logs / "prepare2.log", env))
        phases.append(run("train big", ["diffuse.train", *big, *train, f"hydra.run.dir={work / 'run_big'}"],
                          logs / "train_big.log", env))
        run("prepare tiny (untimed)", ["diffuse.prepare", *tiny], logs / "prepare_tiny.log", env)
        phases.append(run("train tiny", ["diffuse.train", *tiny, *train, f"hydra.run.dir={work / 'run_tiny'}"],
                          logs / "train_tiny.log", env))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    by = {p["name"]: p for p in phases}
    for p in phases if not args.keep else ():
        p.pop("log")  # deleted with the workdir
    ratio = by["train big"]["peak_tree_rss_mb"] / by["train tiny"]["peak_tree_rss_mb"]
    startup = by["prepare again"]["wall_s"]
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    summary = (f"- training peak tree RSS, big / tiny: **{ratio:.2f}** (target <= {TARGET_RATIO}: "
               f"{verdict(ratio <= TARGET_RATIO)})\n"
               f"- second-run start-up (prepare again): **{startup:.1f} s** (target <= {TARGET_STARTUP_S:.0f} s: "
               f"{verdict(startup <= TARGET_STARTUP_S and by['prepare again']['reused'])})")
    meta = {"command": " ".join(["python", *sys.argv]), "date": dt.datetime.now().isoformat(timespec="seconds"),
            "cores": os.cpu_count(), "machine": f"{platform.node()} {platform.machine()} {platform.platform()}",
            "text": text, "corpus_mb": corpus_bytes / 1e6, "corpus_files": n_files, "corpus_build_s": build_s,
            "tokenizer": args.tokenizer, "num_proc": args.num_proc, "steps": args.steps,
            "prepared_cache_mb": prepared_bytes / 1e6, "datasets_arrow_cache_mb": arrow_bytes / 1e6,
            "workdir": str(work) if args.keep else None}
    report = (f"# Prepared data at scale\n\n`{meta['command']}`\n\n{meta['date']}, {meta['cores']} cores "
              f"({meta['machine']}); corpus {meta['corpus_mb']:.1f} MB in {n_files} file(s) (built in {build_s:.1f} s "
              f"from {text}), "
              f"tokenizer={args.tokenizer}, seq_len 256, data.num_proc={args.num_proc or 'config default'}; "
              f"prepared cache {prepared_bytes / 1e6:.1f} MB, datasets Arrow cache {arrow_bytes / 1e6:.1f} MB.\n\n"
              f"{table(phases)}\n\n{summary}\n\nPeak tree RSS/PSS: sampled every 0.2 s over the process and its "
              "descendants; ru_maxrss: the largest single process (wait4). \"to train\": until the `[2/3] train` "
              "log line.\n")
    print("\n" + report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_scale.md").write_text(report)
    (args.out / "data_scale.json").write_text(json.dumps(
        {**meta, "phases": phases, "rss_ratio": ratio, "second_run_startup_s": startup,
         "targets": {"rss_ratio": TARGET_RATIO, "second_run_startup_s": TARGET_STARTUP_S}}, indent=1) + "\n")
    print(f"wrote {args.out / 'data_scale.md'} and {args.out / 'data_scale.json'}")


if __name__ == "__main__":
    main()
