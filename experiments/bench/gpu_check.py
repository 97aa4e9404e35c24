"""GPU check: the paths tested on CPU only — mamba-ssm kernels, bf16, torch.compile, attention masks —
run on a GPU, with every number written to experiments/bench/gpu-<date>.md beside the machine and package versions.

    bash experiments/bench/gpu_check.sh                            # on the GPU machine (installs the wheels first)
    bash experiments/bench/gpu_check.sh --device cpu --tiny        # anywhere: tiny sizes, seconds per section
    python experiments/bench/gpu_check.py [--device cuda|cpu] [--tiny]
                                          [--sections tests,masks,block,kvcache,sampling,p4,p6,train]
                                          [--data FILE] [--out FILE] [--budget-s 450] [--compile|--no-compile]

Sections (each reports ok / FAILED / "skipped: <reason>"; one failing never stops the others):
  tests  the CUDA tests of tests/test_mamba2.py (`-k "kernel or mamba_ssm"`): our SSD scan against mamba-ssm's
         kernel, forward and backward, both directions, with document boundaries; our block against one built of
         mamba-ssm's Mamba2 layers; the kernel path under bf16 autocast. They skip without CUDA and mamba_ssm.
  masks  a padded batch and packed documents through diffuse's transformer (SDPA with a boolean mask; FlexAttention's
         BlockMask too, model.attention=flex) against each row / document alone, fp32 and (CUDA) bf16, causal and not.
  block  block diffusion (objective.block_size=16, BD3LM): the [x_t ; x_0] layout's masks — a padded batch and
         packed documents against each row / document alone, SDPA and FlexAttention, and flex against SDPA —
         then a short training through diffuse.run.fit.train_in (what `python -m diffuse.train` runs) with
         model.attention=flex and =sdpa from the same seed: the loss of every step compared, steps/s of each.
         On CPU the flex training is refused by diffuse (torch has no FlexAttention backward there): reported as
         skipped on CPU with diffuse's one line; the masks and the SDPA training still run.
  kvcache  the transformer's static KV cache (sampler=ar): cached logits against one full causal forward
         (fp32 1e-5, bf16 1e-3 of max |logit|), and AR tokens/s with the cache vs re-running the prefix, batch 1
         and 32 (experiments/bench/ar_cache.py's measurement).
  sampling tokens/s of the diffusion samplers vs AR with its KV cache at batch 1 and 32, random weights: block
         (exact cache), llada and threshold with Fast-dLLM's prefix / dual caches (experiments/bench/sampling.py's
         configurations and timer). The hybrid / speculative sampler is reported "not yet in the tree" until one
         is registered.
  p4     forward + backward ms: our bidirectional mamba2 vs mamba-ssm's own Mamba2 vs SDPA (experiments/bench/gpu_speed.py).
  p6     tokens/s and MFU of a 124M transformer through diffuse.train vs a bare loop over the same module (gpu_speed.py).
  train  a short masked-diffusion training (`python -m diffuse.train`, ~20M parameters, Tiny Shakespeare bytes;
         what the time budget leaves, up to 2 minutes on GPU): val/bpt, tokens/s, samples.
The report is rewritten after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))  # diffuse without an install (the GPU machine runs a bare copy of the tree)

SECTIONS = ("tests", "masks", "block", "kvcache", "sampling", "p4", "p6", "train")
PACKAGES = ("torch", "triton", "lightning", "transformers", "tokenizers", "datasets", "hydra-core", "omegaconf",
            "mamba-ssm", "causal-conv1d", "numpy", "pytest")
DATA_CANDIDATES = (".gpu/data/tinyshakespeare.txt", "shared/data/tinyshakespeare/input.txt",
                   "../shared/data/tinyshakespeare/input.txt")


@dataclass
class Sizes:
    p4_lengths: tuple = (1024, 4096, 16384)
    p4_d_model: int = 768
    p4_layers: int = 4
    p4_batch: int = 2
    p4_d_state: int = 128
    p4_headdim: int = 64
    p4_chunk: int = 256
    p4_warmup: int = 2
    p4_reps: int = 5
    p6_d_model: int = 768
    p6_layers: int = 12
    p6_heads: int = 12
    p6_vocab: int = 50304
    p6_seq_len: int = 1024
    p6_batch: int = 16
    p6_warmup: int = 10
    p6_steps: int = 40
    mask_width: int = 256
    mask_len: int = 128
    block_size: int = 16
    block_d_model: int = 512
    block_layers: int = 6
    block_heads: int = 8
    block_seq_len: int = 256  # the layout doubles it: 512 positions a row
    block_batch: int = 32
    block_steps: int = 40
    block_warmup: int = 10  # steps before the timer starts (flex compiles its kernels in the first ones)
    ar_d_model: int = 512
    ar_layers: int = 8
    ar_heads: int = 8
    ar_vocab: int = 8192
    ar_prompt: int = 16
    ar_length: int = 256
    sample_batches: tuple = (1, 32)
    sample_reps: int = 2
    train: list = field(default_factory=lambda: [
        "model.d_model=512", "model.n_layers=6", "model.n_heads=8", "data.seq_len=256", "data.batch_size=64",
        "data.eval_batch_size=64", "trainer.max_steps=10000", "trainer.val_check_interval=500",
        "trainer.limit_val_batches=20", "trainer.log_every_n_steps=50", "num_samples=3", "sample_length=200"])
    train_seconds: int = 120


TINY = Sizes(p4_lengths=(64, 256), p4_d_model=64, p4_layers=2, p4_d_state=16, p4_headdim=16, p4_chunk=32,
             p4_warmup=2, p4_reps=3, p6_d_model=64, p6_layers=2, p6_heads=2, p6_vocab=512, p6_seq_len=64,
             p6_batch=4, p6_warmup=3, p6_steps=8, mask_width=64, mask_len=32,
             block_d_model=64, block_layers=2, block_heads=2, block_seq_len=64, block_batch=4, block_steps=8,
             block_warmup=3, ar_d_model=64, ar_layers=2, ar_heads=2, ar_vocab=512, ar_prompt=4, ar_length=32,
             sample_batches=(1, 8), sample_reps=3,
             train=["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "data.seq_len=64", "data.batch_size=8",
                    "data.eval_batch_size=8", "trainer.max_steps=40", "trainer.val_check_interval=20",
                    "trainer.limit_val_batches=2", "trainer.log_every_n_steps=10", "num_samples=2", "sample_length=48"],
             train_seconds=30)
# rough seconds each section needs on an H100 / H200 (the wheels' Triton kernels and flex compile on first use);
# guesses, not yet measured on a GPU. A section starts only when its estimate fits in what --budget-s leaves;
# train takes what is left (at least its estimate, at most Sizes.train_seconds of training). Sum: 445 s.
ESTIMATE_S = {"tests": 60, "masks": 30, "block": 75, "kvcache": 25, "sampling": 45, "p4": 50, "p6": 100, "train": 60}


class Skip(Exception):
    """A section that cannot run here: reported as `skipped: <reason>`."""


class Report:
    """Markdown lines, echoed to stdout and rewritten to `path` after every section."""

    def __init__(self, path: Path):
        self.path, self.lines = path, []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.lines) + "\n")


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        module = {"mamba-ssm": "mamba_ssm", "causal-conv1d": "causal_conv1d", "hydra-core": "hydra"}.get(name, name)
        try:  # installed with --target: no metadata on the path Python searches, but the module has a version
            return str(getattr(__import__(module), "__version__", "present"))
        except Exception as err:
            return f"missing ({type(err).__name__})"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" (uncommitted changes)" if dirty else "")
    except Exception:
        stamp = REPO / ".gpu" / "COMMIT"  # written by gpu_check.sh --prepare: the tree that travelled
        return stamp.read_text().strip() if stamp.is_file() else "unknown (no git)"


def machine(device: torch.device) -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    mem = next((int(line.split()[1]) / 2**20 for line in open("/proc/meminfo") if line.startswith("MemTotal")),
               math.nan) if Path("/proc/meminfo").is_file() else math.nan
    lines = [f"- host: {platform.node()}, {platform.platform()}, Python {platform.python_version()}",
             f"- CPU: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; torch threads {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        smi = shutil.which("nvidia-smi")
        driver = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                text=True).stdout.strip() if smi else "?"
        lines.append(f"- GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
                     f"capability {p.major}.{p.minor}; driver {driver}; CUDA (torch) {torch.version.cuda}")
    else:
        lines.append("- GPU: none visible to torch")
    lines.append(f"- device used: {device}")
    lines.append("- packages: " + ", ".join(f"{n} {version(n)}" for n in PACKAGES))
    return lines


# -- sections ---------------------------------------------------------------------------------------------
def section_tests(args, size, device, out):
    cmd = [sys.executable, "-m", "pytest", "-rA", "--tb=short", "-p", "no:cacheprovider",
           "tests/test_mamba2.py", "-k", "kernel or mamba_ssm"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if device.type != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine: the CUDA tests skip, as asked
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    out(f"`{' '.join(cmd[2:])}` → exit {done.returncode}")
    out("")
    results = re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED) (.+)$", text, flags=re.M)
    for status, what in results:
        out(f"- {status} {what}")
    errors = [line for line in text.splitlines() if line.startswith("E ")][:40]
    if errors:
        out("")
        out("```")
        out("\n".join(errors))
        out("```")
    summary = next((line.strip("= ") for line in reversed(text.splitlines())
                    if re.search(r"\d+ (passed|failed|skipped|error).* in [\d.]+s", line)), "?")
    out("")
    out(f"summary: {summary}")
    if done.returncode not in (0, 5) or any(s in ("FAILED", "ERROR") for s, _ in results):
        raise RuntimeError(f"pytest exit {done.returncode}: {summary}")
    from gpu_speed import mamba_ssm_missing

    missing = mamba_ssm_missing(device)  # the CUDA tests skipped: say so, not "ok"
    if missing:
        raise Skip(f"{missing}; the CUDA tests skip ({summary})")
    return summary


def section_masks(args, size, device, out):
    """A padded batch and packed documents through diffuse's transformer — SDPA with the boolean mask
    (layers.attention_mask) and, where the model offers it, FlexAttention's BlockMask (model.attention=flex) —
    against each row / document alone (no mask: plain SDPA)."""
    import inspect

    from diffuse.models import transformer

    L = size.mask_len
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 96, (4, L), generator=gen)
    lengths = [L, L - 5, L // 2, 3]  # padded batch: right padding (segment 0)
    padded = torch.zeros(4, L, dtype=torch.long)
    for r, n in enumerate(lengths):
        padded[r, :n] = 1
    cuts = [(0, L // 3, 1), (L // 3, L - 4, 2)]  # packed: two documents, then 4 padding positions
    packed = torch.zeros(4, L, dtype=torch.long)
    for a, b, s in cuts:
        packed[:, a:b] = s
    kinds = ["sdpa"]
    if "attention" in inspect.signature(transformer.Transformer).parameters and \
            "flex" in getattr(transformer, "ATTENTION", ()):
        kinds.append("flex")
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
    out("| attention | case | dtype | causal | max abs diff / max abs | finite | ok |")
    out("|---|---|---|---|---|---|---|")
    failed = []
    for kind in kinds:
        torch.manual_seed(0)
        extra = {} if kind == "sdpa" else {"attention": kind}
        model = transformer.Transformer(vocab_size=100, d_model=size.mask_width, n_layers=2,
                                        n_heads=max(1, size.mask_width // 64), **extra).to(device).eval()
        for dtype in dtypes:
            for causal in (False, True):
                for case, seg, spans in (("padded rows", padded, [[(0, n)] for n in lengths]),
                                         ("packed documents", packed, [[(a, b) for a, b, _ in cuts]] * 4)):
                    x, s = ids.to(device), seg.to(device)
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                         enabled=dtype != torch.float32):
                        batch = model(ids=x, segment_ids=s, causal=causal).float()
                        worst, scale = 0.0, 0.0
                        for r, row in enumerate(spans):
                            for a, b in row:
                                alone = model(ids=x[r:r + 1, a:b], causal=causal).float()[0]
                                worst = max(worst, (batch[r, a:b] - alone).abs().max().item())
                                scale = max(scale, alone.abs().max().item())
                    rel, finite = worst / scale, bool(batch.isfinite().all())
                    ok = rel <= tol[dtype] and finite
                    failed += [] if ok else [f"{kind} {case} {dtype} causal={causal}"]
                    out(f"| {kind} | {case} | {str(dtype).split('.')[-1]} | {causal} | {rel:.2e} | {finite} | "
                        f"{'ok' if ok else 'FAILED'} (tol {tol[dtype]:g}) |")
    if kinds == ["sdpa"]:
        out("")
        out("FlexAttention: skipped: diffuse.models.transformer has no model.attention=flex")
    if failed:
        raise RuntimeError("mask equivalence failed: " + ", ".join(failed))


def section_block(args, size, device, out):
    from diffuse.errors import DiffuseError
    from gpu_speed import block_mask_cases, train_block

    out("### masks")
    out("")
    failed = block_mask_cases(size, device, out)
    out("")
    out("### training: model.attention=flex vs sdpa")
    out("")
    if args.data is None:
        out("training: skipped: Tiny Shakespeare not found (--data FILE, or gpu_check.sh --prepare)")
        if failed:
            raise RuntimeError("block mask equivalence failed: " + ", ".join(failed))
        return "masks ok; training skipped: no data"
    runs, skipped = {}, {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-block-") as work:
        for attention in ("sdpa", "flex"):
            try:
                runs[attention] = train_block(size, device, args.data, Path(work), attention)
            except DiffuseError as err:  # flex on CPU: diffuse refuses it in one line, before any step
                if device.type != "cpu" or attention != "flex":
                    raise
                skipped[attention] = str(err)
    first = next(iter(runs.values()), None)
    if first:
        o = [x for x in first["overrides"] if not x.startswith(("paths.", "data.path"))]
        out(f"`train_in` with `{' '.join(o)}` (model.attention per row), {size.block_steps} steps; steps/s over "
            f"the last {size.block_steps - size.block_warmup}")
        out("")
    out("| attention | steps/s | loss step 1 | loss step " + f"{size.block_steps}" + " | wall s |")
    out("|---|---|---|---|---|")
    for attention in ("sdpa", "flex"):
        if attention in runs:
            r = runs[attention]
            out(f"| {attention} | {r['steps_per_s']:.2f} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | {r['wall']:.0f} |")
        else:
            out(f"| {attention} | skipped on CPU (the reason below) | | | |")
    note = []
    if len(runs) == 2:
        a, b = runs["flex"]["losses"], runs["sdpa"]["losses"]
        n = min(len(a), len(b))
        gap = max(abs(x - y) / max(abs(y), 1e-8) for x, y in zip(a[:n], b[:n]))
        tol = 2e-2 if device.type == "cuda" else 1e-3  # bf16-mixed on GPU; fp32 elsewhere
        ok = gap <= tol and n == size.block_steps
        out("")
        out(f"flex vs sdpa, same seed: worst relative loss difference over {n} steps {gap:.2e} "
            f"(tol {tol:g}: {'ok' if ok else 'FAILED'}); last step {a[n - 1]:.4f} vs {b[n - 1]:.4f}; "
            f"flex / sdpa steps/s {runs['flex']['steps_per_s'] / runs['sdpa']['steps_per_s']:.2f}×")
        failed += [] if ok else [f"flex vs sdpa loss differs by {gap:.2e}"]
        note.append(f"flex {runs['flex']['steps_per_s']:.2f} / sdpa {runs['sdpa']['steps_per_s']:.2f} steps/s, "
                    f"loss gap {gap:.1e}")
    for attention, why in skipped.items():
        out("")
        out(f"{attention} training: skipped on CPU: {why}")
        note.append(f"{attention} training skipped on CPU (no FlexAttention backward in torch)")
        if "sdpa" in runs:
            note.append(f"sdpa {runs['sdpa']['steps_per_s']:.2f} steps/s")
    if failed:
        raise RuntimeError("block diffusion: " + ", ".join(failed))
    return "masks ok; " + "; ".join(note)


def section_kvcache(args, size, device, out):
    from gpu_speed import run_kv_cache

    r = run_kv_cache(size, device, out)
    if r["failed"]:
        raise RuntimeError(", ".join(r["failed"]))
    return ", ".join(f"batch {b}: cache {v[True]:,.0f} vs none {v[False]:,.0f} tokens/s" for b, v in r["rows"].items())


def section_sampling(args, size, device, out):
    from gpu_speed import SAMPLING_LABELS, run_sampling

    r = run_sampling(size, device, out)
    if r["failed"]:
        raise RuntimeError("sampler(s) failed: " + ", ".join(r["failed"]))
    ar, big = r["rows"][SAMPLING_LABELS[0]], size.sample_batches[-1]
    best = max((k for k in r["rows"] if k != SAMPLING_LABELS[0]), key=lambda k: r["rows"][k][big])
    return (f"batch {big}: fastest diffusion sampler {best} {r['rows'][best][big] / ar[big]:.2f}× AR+cache; "
            f"hybrid/speculative: {'registered, not measured' if r['hybrid'] else 'not yet in the tree'}")


def section_p4(args, size, device, out):
    from gpu_speed import mamba_ssm_missing, run_p4

    results = run_p4(size, device, bf16=device.type == "cuda", out=out)
    missing = mamba_ssm_missing(device)
    if missing:
        return f"mamba-ssm column skipped: {missing}"
    return "ours / mamba-ssm: " + ", ".join(f"L={k} {v['ratio_seg']:.2f}×" for k, v in results.items())


def section_p6(args, size, device, out):
    from gpu_speed import run_p6

    compile = args.compile if args.compile is not None else device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="gpu-check-p6-") as work:
        r = run_p6(size, device, args.data, Path(work), compile, out)
    return (f"framework {r['framework']:,.0f} / bare {r['bare']:,.0f} tokens/s = {r['ratio']:.3f}"
            + ("" if compile else "; not compiled"))


def section_train(args, size, device, out):
    # what is left of --budget-s, less ~45 s for start-up, the last validation, sampling and the checkpoint
    seconds = max(10, min(size.train_seconds, int(args.deadline - time.time()) - 45))
    with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as work:
        run = Path(work) / "run"
        overrides = ["data=text", f"data.path={args.data}", "tokenizer=byte", "objective=masked_discrete",
                     "trainer=gpu" if device.type == "cuda" else "trainer.accelerator=cpu", *size.train,
                     f"+trainer.max_time='00:00:{seconds // 60:02d}:{seconds % 60:02d}'", "callbacks.progress_bar=null",
                     f"hydra.run.dir={run}", f"paths.cache_dir={Path(work) / 'cache'}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "diffuse.train", *overrides], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=seconds + 300)
        wall = time.perf_counter() - start
        text = done.stdout + done.stderr
        out(f"`python -m diffuse.train {' '.join(o for o in overrides if not o.startswith(('hydra.', 'paths.')))}`")
        out(f"exit {done.returncode}; {wall:.0f} s wall for a {seconds} s training budget")
        if done.returncode != 0:
            out("```")
            out("\n".join(text.splitlines()[-25:]))
            out("```")
            raise RuntimeError(f"diffuse.train exit {done.returncode}")
        metrics = json.loads((run / "metrics.json").read_text())
    params = re.search(r"model: ([\d.]+)M parameters", text)
    step = re.search(r"done at step (\d+)", text)
    out("")
    out(f"- parameters: {params.group(1) + 'M' if params else '?'}; steps: {step.group(1) if step else '?'}")
    for key in ("val/bpt", "val/nelbo", "train/loss", "train/tokens_per_sec"):
        value = metrics.get(key)
        out(f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}")
    note = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("val/bpt", "train/tokens_per_sec") if metrics.get(k) is not None)
    samples = re.findall(r"^--- sample \d+ .*?---\n(.*?)(?=^--- sample |\Z)", done.stdout, flags=re.M | re.S)
    for i, sample in enumerate(samples):
        out("")
        out(f"sample {i}:")
        out("```")
        out(sample.strip()[:600])
        out("```")
    return note


RUNNERS = {"tests": section_tests, "masks": section_masks, "block": section_block, "kvcache": section_kvcache,
           "sampling": section_sampling, "p4": section_p4, "p6": section_p6, "train": section_train}


def find_data(given: str | None) -> Path | None:
    for candidate in ([given] if given else []) + [os.environ.get("DATA", "")] + list(DATA_CANDIDATES):
        if candidate and (REPO / candidate).is_file():
            return (REPO / candidate).resolve()
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: seconds per section")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--data", default=None, help="Tiny Shakespeare input.txt (else $DATA, .gpu/data, ../shared/data)")
    parser.add_argument("--out", default=None, help="report path (default experiments/bench/gpu-<date>[-<device>-tiny].md)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="seconds for all sections: one that would not fit in what is left is skipped, the training shrinks")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in RUNNERS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu --tiny)")
    if args.out is None:
        date = datetime.date.today().isoformat()
        suffix = "" if args.device.startswith("cuda") and not args.tiny else \
            f"-{args.device.split(':')[0]}{'-tiny' if args.tiny else ''}"
        args.out = str(HERE / f"gpu-{date}{suffix}.md")
    args.data = find_data(args.data)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    size = TINY if args.tiny else Sizes()
    device = torch.device(args.device)
    if device.type == "cpu" and args.tiny:  # tiny tensors on a shared small CPU: one thread beats threads that fight
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # the subprocesses too
    start = time.time()
    args.deadline = start + args.budget_s
    report = Report(Path(args.out))
    report(f"# GPU check, {datetime.date.today().isoformat()}{' — TINY sizes, not a GPU result' if args.tiny else ''}")
    report("")
    report(f"`{' '.join(['experiments/bench/gpu_check.py', *(argv if argv is not None else sys.argv[1:])])}` "
           f"at commit {commit()}. Written by experiments/bench/gpu_check.py.")
    report("")
    for line in machine(device):
        report(line)
    report(f"- data: {args.data or 'not found (p6, train and the block training skip)'}")
    report.save()
    status = {}
    for name in args.sections:
        report("")
        report(f"## {name}")
        report("")
        t0 = time.time()
        try:
            if name in ("p6", "train") and args.data is None:
                raise Skip("Tiny Shakespeare not found (--data FILE, or gpu_check.sh --prepare)")
            left = args.deadline - t0
            if not args.tiny and left < ESTIMATE_S[name]:
                raise Skip(f"time budget: {left:.0f} s left of --budget-s {args.budget_s:.0f}, this needs ~{ESTIMATE_S[name]} s")
            note = RUNNERS[name](args, size, device, report)
            status[name] = "ok" + (f" ({note})" if note else "")
        except Skip as why:
            status[name] = f"skipped: {why}"
        except Exception as err:
            status[name] = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            report("```")
            report(traceback.format_exc().rstrip()[-3000:])
            report("```")
        report("")
        report(f"**{name}: {status[name]}** ({time.time() - t0:.0f} s)")
        report.save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report("")
    report("## summary")
    report("")
    for name, s in status.items():
        report(f"- {name}: {s}")
    report(f"- total: {time.time() - start:.0f} s")
    report.save()
    print(f"report: {args.out}")
    return 1 if any(s.startswith("FAILED") for s in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
