"""Shared test helpers: offline environment, entry points run as a process or in-process, a tiny
text corpus, stub backbones, and one tiny debug checkpoint trained once per session."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

# before anything imports datasets / transformers: tests never touch the network, and the
# tokenizer/corpus cache is private to the session (a fresh machine must pass too)
# One intra-op thread: the models here are tiny, and two threads on a busy 2-core machine run a
# training step ~8x slower than one (they spin waiting for each other).
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
os.environ.update(OFFLINE)
# setdefault: training processes import this file too (test callbacks), and a second DDP rank inherits their
# environment; each would otherwise see its own cache and wait for prepared data the other never writes
os.environ.setdefault("DIFFUSE_CACHE", tempfile.mkdtemp(prefix="diffuse-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)

from diffuse.objectives.base import SpecialTokens  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# A made-up 40-token vocabulary for unit tests: 36 ordinary tokens, then the specials.
VOCAB = 40
SPECIAL = SpecialTokens(pad=36, bos=37, eos=38, mask=39)


# -- entry points -----------------------------------------------------------------------------------
def run_cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m module args…` in a fresh interpreter, offline, from the repository root."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env={**os.environ, **OFFLINE},
                          capture_output=True, text=True, timeout=timeout)


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def __repr__(self):
        return f"Result(rc={self.returncode}, stderr={self.stderr[-2000:]!r})"


def call_main(module: str, *args: str) -> Result:
    """The same Hydra entry point as the CLI (argv parsing, config composition, one-line errors,
    exit code) without paying for a new interpreter: ~1 s instead of ~8 s per call."""
    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = [module, *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return Result(code, out.getvalue(), err.getvalue())


def error_lines(stderr: str) -> list[str]:
    """The lines of a one-line error report (ignoring warnings and progress output)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# -- data -----------------------------------------------------------------------------------------
WORDS = ("the a cat dog sat on mat ran far away quick brown fox jumps over lazy river stone tree light "
         "café naïve über 東京 ✓").split()


def write_corpus(path: Path, paragraphs: int = 200, seed: int = 0) -> Path:
    rng = random.Random(seed)
    paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))).capitalize() + "."
             for _ in range(paragraphs)]
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small UTF-8 text file: ~200 paragraphs, tokenized in a blink with tokenizer=byte."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def tiny_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    """A debug run on the small corpus with the byte tokenizer: a few seconds in-process."""
    return ["debug=default", "data=text", f"data.path={corpus}", "tokenizer=byte", "num_samples=0",
            f"hydra.run.dir={run_dir}", *extra]


# -- stub backbones -------------------------------------------------------------------------------
class ZeroBackbone(nn.Module):
    """Implements the backbone API; every logit is zero (the uniform predictor)."""

    time_conditioned = False

    def __init__(self, vocab_size: int = VOCAB):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(()))  # samplers ask for the device via parameters()

    def forward(self, ids=None, embeds=None, t=None, segment_ids=None, causal=False):
        return torch.zeros(*ids.shape, 1) + 0 * self.anchor

    def logits(self, hidden):
        return hidden.expand(*hidden.shape[:-1], self.vocab_size).clone()


class UniformBlockBackbone(ZeroBackbone):
    """ZeroBackbone that also takes a block layout (block diffusion, the hybrid): the uniform predictor there."""

    supports_block_layout = True

    def forward(self, ids=None, t=None, segment_ids=None, layout=None, **_):
        return torch.zeros(*ids.shape, 1) + 0 * self.anchor


def packed_batch(B: int, L: int, seed: int = 0, docs: bool = False, doc_bos: bool = False) -> dict:
    """Random rows of the 40-token vocabulary starting with BOS; `docs`: two documents and 3 padding positions per
    row (`doc_bos`: the second document starts with BOS too)."""
    ids = torch.randint(0, 36, (B, L), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = SPECIAL.bos
    seg = torch.ones_like(ids)
    if docs:
        seg[:, L // 3:] = 2
        if doc_bos:
            ids[:, L // 3] = SPECIAL.bos
        seg[:, L - 3:] = 0
        ids[:, L - 3:] = SPECIAL.pad
    return {"input_ids": ids, "segment_ids": seg}


class FixedLogits(nn.Module):
    """Returns given logits [B, L, V] whatever the input; records the inputs it saw."""

    time_conditioned = False

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.fixed = logits
        self.seen: list[torch.Tensor] = []
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, ids=None, embeds=None, t=None, segment_ids=None, causal=False):
        self.seen.append(ids.clone())
        return self.fixed.clone()

    def logits(self, hidden):
        return hidden


def tiny_transformer(vocab_size: int = VOCAB, seed: int = 0, **kw):
    from diffuse.models.transformer import Transformer

    torch.manual_seed(seed)
    kw = {"d_model": 32, "n_layers": 2, "n_heads": 2, **kw}
    return Transformer(vocab_size=vocab_size, **kw).eval()


# -- one tiny debug checkpoint per session (the real CLI, default preset) ---------------------------
@pytest.fixture(scope="session")
def debug_run(tmp_path_factory) -> Path:
    """`python -m diffuse.train debug=default`: masked diffusion on the embedded corpus, 5 steps."""
    run_dir = tmp_path_factory.mktemp("debug_run")
    proc = run_cli("diffuse.train", "debug=default", "num_samples=0", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    return run_dir
