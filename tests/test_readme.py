"""Every command README.md shows is run here, at tiny sizes and offline (issue 24).

`readme_commands()` extracts them: each line of a ```bash fence (its `# comment` dropped) and each inline
code span of the prose and tables that starts a command (`python …`, `make …`, `torchrun …`, `srun`, or a
script `….py` with arguments), whitespace collapsed. `COMMANDS` maps each one, by its exact text, to how it
runs tiny; `test_every_readme_command_is_listed` holds the two equal, so a README edit that adds or changes
a command fails until `COMMANDS` follows, and `test_readme_command` runs each one (exit 0, and the file the
README promises where it names one).

How a command runs tiny (`Tiny`): its placeholders are replaced (`replace`, in order: `…`, `<date>/<time>`,
`/path/to/file_or_folder`, `train.txt`, … become fixtures built here, written `{name}`, see `Fixtures`),
then the overrides that make it tiny are appended (`extra`: `debug=default`, two steps, one validation
batch, one short sample; a value given twice on the command line is Hydra's last one) together with where
its outputs go. `&&` joins commands run in turn. `python -m diffuse.<x>` runs in-process (`call_main`) unless
`cli=True` (a fresh interpreter: DDP relaunches it); `make train ARGS=…` runs the python command
`make -n train` prints. A command that cannot run here (GPUs, a cluster, the suite itself) has either a tiny
substitute with its `note` (the same overrides composed with `--cfg job`) or a `Skip` with the reason.

Fixtures are built once per session and shared: the masked and autoregressive checkpoints of
`evaluation_runs` (byte tokenizer, 32-token rows), the README's own block-diffusion run and its own 2 × 2
sweep (for `sample … length=256` and `report`), a few text files (WikiText-style, with the blank lines
holding a space, as WikiText-2's do).
"""

from __future__ import annotations

import atexit
import random
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, call_main, run_cli, write_corpus

README = REPO / "README.md"
BASE = Path(tempfile.mkdtemp(prefix="diffuse-readme-"))
atexit.register(shutil.rmtree, BASE, ignore_errors=True)


# -- extraction -------------------------------------------------------------------------------------
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELL_FENCES = {"bash", "sh", "shell", "console"}
STARTS_A_COMMAND = re.compile(r"(python|make|torchrun|srun)\b|\S+\.py\s")


def readme_commands(text: str | None = None) -> list[str]:
    """The commands README.md shows, in order (repeats kept)."""
    text = README.read_text(encoding="utf-8") if text is None else text
    found = []
    for fence in FENCE.finditer(text):
        if fence.group(1) in SHELL_FENCES:
            for line in fence.group(2).splitlines():
                line = " ".join(re.sub(r"\s#\s.*$", "", line).split())
                if line:
                    found.append(line)
    for span in re.finditer(r"`([^`]+)`", FENCE.sub("", text)):  # inline code, possibly across a line break
        command = " ".join(span.group(1).split())
        if STARTS_A_COMMAND.match(command):
            found.append(command)
    return found


# -- how each command runs tiny ---------------------------------------------------------------------
@dataclass(frozen=True)
class Tiny:
    replace: tuple[tuple[str, str], ...] = ()  # README text → runnable text, in order; {name}: a fixture
    extra: tuple[str, ...] = ()                # appended to the first command of the line
    expect: tuple[str, ...] = ()               # files it must leave ({out}: its output folder)
    stdout: str = ""                           # a string its output must hold (--cfg / --help substitutes)
    cli: bool = False                          # a fresh interpreter (run_cli) instead of call_main
    note: str = ""                             # what the substitute leaves out


@dataclass(frozen=True)
class Skip:
    reason: str


TRAIN = ("debug=default", "trainer.max_steps=2", "trainer.limit_val_batches=1")  # 64-wide, 2 layers, 32-token rows
RUN = (*TRAIN, "hydra.run.dir={out}")
SWEEP = (*TRAIN, "num_samples=0", "hydra.sweep.dir={out}")
EVAL = ("num_samples=1", "length=8", "limit_batches=1", "t_samples=1", "reference_samples=2", "progress=false",
        "hydra.run.dir={out}")
DISTILL = ("max_steps=1", 'overrides=["debug=default","num_samples=0","trainer.limit_val_batches=1"]',  # one argv item
           "hydra.run.dir={out}")
TRAINED = ("{out}/metrics.json", "{out}/checkpoints/last.ckpt")
LM_EVAL = ("limit=2", "mc_samples=4", "steps=4", "hydra.run.dir={out}")
LM_EVAL_FILES = ("{out}/results.json", "{out}/lm_eval.md")
COMPOSED = "GPU-only: composed (--cfg job), not trained"
COMMAND_MODULES = ("train", "sample", "evaluate", "compare", "export", "prepare", "distill", "report")

COMMANDS: dict[str, Tiny | Skip] = {
    # -- the top: make train / make test
    "make train": Tiny(extra=RUN, expect=TRAINED,
                       note="the python command `make -n train` prints (no install), at debug sizes"),
    "make test": Skip("the whole suite, this file included: `make test` is what runs this test"),
    'make train ARGS="trainer.max_steps=3000"':
        Tiny(extra=RUN, expect=TRAINED, note="the python command `make -n train ARGS=…` prints, 2 steps"),
    # -- recipes and config groups
    "python -m diffuse.train recipe=tdlm": Tiny(extra=RUN, expect=TRAINED),
    "python -m diffuse.train recipe=tdlm objective=autoregressive": Tiny(extra=RUN, expect=TRAINED),
    "python -m diffuse.train recipe=dimba": Tiny(extra=RUN, expect=TRAINED),
    "python -m diffuse.train recipe=llada": Tiny(extra=RUN, expect=TRAINED),
    "python -m diffuse.train recipe=a2d": Tiny(extra=RUN, expect=TRAINED),
    "python -m diffuse.train recipe=diffusion_gemma": Tiny(extra=RUN, expect=TRAINED),
    "python -m diffuse.train model=mamba2 objective=continuous regularizer=cdlm_consistency":
        Tiny(extra=RUN, expect=TRAINED),
    "python -m diffuse.distill":
        Tiny(replace=(("python -m diffuse.distill", "python -m diffuse.distill teacher={ckpt}"),), extra=DISTILL,
             expect=("{out}/distill.json", "{out}/round1/checkpoints/last.ckpt")),
    "python -m diffuse.train --cfg job [overrides]":
        Tiny(replace=(("[overrides]", "debug=default"),), stdout="d_model: 64"),
    "python -m diffuse.<command>": Tiny(
        replace=(("python -m diffuse.<command>",
                  " && ".join(f"python -m diffuse.{c} --help" for c in COMMAND_MODULES)),),
        note="a pattern: each of the eight commands starts (--help); each runs below in its own README command"),
    # -- your own text
    "python -m diffuse.train data=text data.path=/path/to/file_or_folder":
        Tiny(replace=(("/path/to/file_or_folder", "{text}"),), extra=RUN, expect=TRAINED),
    "python -m diffuse.train data=text data.path=train.txt data.val_path=valid.txt":
        Tiny(replace=(("train.txt", "{train_txt}"), ("valid.txt", "{valid_txt}")), extra=RUN, expect=TRAINED),
    "python -m diffuse.train data=text data.path=corpus/ data.sample_by=document tokenizer=byte":
        Tiny(replace=(("corpus/", "{folder}/"),), extra=RUN, expect=TRAINED),
    "python -m diffuse.train data=text data.path=… data.train_tokens=50000":
        Tiny(replace=(("…", "{text}"),), extra=RUN, expect=TRAINED),
    "python -m diffuse.prepare <the overrides of diffuse.train>":
        Tiny(replace=(("<the overrides of diffuse.train>", "debug=default"),), stdout="train:"),
    "experiments/bench/data_scale.py --gb 2": Skip(
        "a benchmark on 2 GB of text (~10 min) that reads ../shared/data; even `--mb 0.1 --steps 1` is five fresh "
        "interpreters (62 s on 2 cores), past this file's budget: the prepare/train pipeline it times runs here in "
        "`python -m diffuse.prepare …` and the `data=text` commands"),
    # -- sampling
    "python -m diffuse.sample ckpt=experiments/runs/<date>/<time>/checkpoints/last.ckpt num_samples=4 length=64":
        Tiny(replace=(("experiments/runs/<date>/<time>/checkpoints/last.ckpt", "{ckpt}"),),
             extra=("length=16", "hydra.run.dir={out}"), expect=("{out}/samples.jsonl",),
             note="length=16: the tiny checkpoint's rows are 32 tokens"),
    'python -m diffuse.sample ckpt=… sampler=ancestral steps=32 prompt="The for statement"':
        Tiny(replace=(("…", "{ckpt}"),), extra=("length=8", "hydra.run.dir={out}"), expect=("{out}/samples.jsonl",),
             note="length=8: BOS + the 17-byte prompt + 8 fit the tiny checkpoint's 32-token rows"),
    'python -m diffuse.sample ckpt=…/last.ckpt sampler=llada steps=24 prompt="The" trace=replay.html':
        Tiny(replace=(("…/last.ckpt", "{ckpt}"), ("trace=replay.html", "trace={out}/replay.html")),
             extra=("num_samples=1", "length=8", "hydra.run.dir={out}"), expect=("{out}/replay.html",)),
    "python -m diffuse.demo ckpt=…/last.ckpt compare=…/ar.ckpt":
        Tiny(replace=(("…/last.ckpt", "{ckpt}"), ("…/ar.ckpt", "{ar_ckpt}")), extra=("--cfg", "job"),
             stdout="host: 127.0.0.1", note="composed (--cfg job): the server itself is driven by tests/test_demo.py"),
    "python -m diffuse.train objective.block_size=16": Tiny(extra=RUN, expect=TRAINED),
    "python -m diffuse.sample ckpt=…/last.ckpt length=256 steps=8":
        Tiny(replace=(("…/last.ckpt", "{block_ckpt}"),), extra=("num_samples=1", "hydra.run.dir={out}"),
             expect=("{out}/samples.jsonl",)),
    # -- distillation
    "python -m diffuse.distill teacher=…/last.ckpt method=sdtt rounds=4 steps=64":
        Tiny(replace=(("…/last.ckpt", "{ckpt}"),), extra=DISTILL,
             expect=("{out}/distill.json", "{out}/round4/checkpoints/last.ckpt")),
    "python -m diffuse.distill teacher=…/last.ckpt method=cdlm method.block_size=8":
        Tiny(replace=(("…/last.ckpt", "{ckpt}"),),
             extra=("method.num_trajectories=4", "method.gen_length=8", "method.top_k=4", "method.prompt_length=2",
                    *DISTILL),
             expect=("{out}/round1/trajectories.pt", "{out}/round1/checkpoints/last.ckpt")),
    "python -m diffuse.distill teacher=… max_steps=2000 lr=1e-4 'overrides=[\"data.batch_size=8\",\"trainer=gpu\"]'":
        Tiny(replace=(("…", "{ckpt}"),
                      ('"trainer=gpu"]', ('"trainer=gpu","trainer.accelerator=cpu","debug=default","num_samples=0",'
                                          '"trainer.limit_val_batches=1"]'))),
             extra=("max_steps=1", "hydra.run.dir={out}"), expect=("{out}/round1/checkpoints/last.ckpt",),
             note="trainer=gpu on the CPU (trainer.accelerator=cpu: bf16-mixed autocast there)"),
    # -- sweeps
    "python -m diffuse.train -m objective=masked_discrete,autoregressive schedule=linear,cosine":
        Tiny(extra=SWEEP, expect=("{out}/0/metrics.json", "{out}/3/metrics.json")),
    "python -m diffuse.train -m recipe=dimba regularizer.weight=0.3,0.5,1.0 regularizer.delta_min=20,50":
        Tiny(extra=SWEEP, expect=("{out}/0/metrics.json", "{out}/5/metrics.json")),
    "python -m diffuse.report experiments/runs/multirun/<date>/<time> [--metric val/nelbo] [--out DIR] [--no-plot]":
        Tiny(replace=(("experiments/runs/multirun/<date>/<time>", "{multirun}"),
                      ("[--metric val/nelbo] [--out DIR] [--no-plot]", "--metric val/nelbo --out {out} --no-plot")),
             expect=("{out}/report.md",)),
    "python -m diffuse.train -m hparams_search=cdlm_optuna hydra.sweeper.n_trials=20":
        Tiny(extra=(*SWEEP, "hydra.sweeper.n_trials=2"), expect=("{out}/0/metrics.json", "{out}/1/metrics.json"),
             note="2 trials of the 20"),
    # -- multi-process and multi-node
    "python -m diffuse.train trainer=ddp trainer.devices=4": Tiny(extra=("--cfg", "job"), stdout="DDPStrategy",
                                                                   note=COMPOSED),
    "python -m diffuse.train trainer=ddp trainer.devices=2 trainer.accelerator=cpu":  # debug's 2 validation batches
        Tiny(extra=("debug=default", "trainer.max_steps=2", "hydra.run.dir={out}"), expect=TRAINED, cli=True),
    "python -m diffuse.train trainer=fsdp trainer.devices=8 model=transformer_small":
        Tiny(extra=("--cfg", "job"), stdout="FSDPStrategy", note=COMPOSED + " (Lightning refuses FSDP on CPU)"),
    ("torchrun --nnodes 2 --nproc-per-node 4 --node-rank $i --master-addr $HOST0 --master-port 29500 -m diffuse.train "
     "trainer=ddp trainer.devices=4 trainer.num_nodes=2 hydra.run.dir=/shared/run"):
        Tiny(replace=((("torchrun --nnodes 2 --nproc-per-node 4 --node-rank $i --master-addr $HOST0 "
                        "--master-port 29500 -m diffuse.train"), "python -m diffuse.train"), ("/shared/run", "{out}")),
             extra=("--cfg", "job"), stdout="num_nodes: 2", note="two nodes of GPUs: the diffuse.train part composed"),
    "srun": Skip("SLURM's launcher, named in prose: needs a cluster (the submitit command below composes its config)"),
    ("python -m diffuse.train -m hydra/launcher=submitit_slurm trainer=ddp trainer.devices=4 trainer.num_nodes=2 "
     "hydra.launcher.partition=…"):
        Tiny(replace=(("-m hydra/launcher", "hydra/launcher"),
                      ("hydra.launcher.partition=…", "hydra.launcher.partition=gpu")),
             extra=("--cfg", "hydra"), stdout="SlurmLauncher",
             note="a SLURM cluster: the launcher's config composed (--cfg hydra, which Hydra refuses beside -m)"),
    # -- evaluate, compare, export, analyse
    "python -m diffuse.evaluate ckpt=…/last.ckpt data=text data.path=valid.txt":
        Tiny(replace=(("…/last.ckpt", "{ckpt}"), ("valid.txt", "{valid_txt}")), extra=EVAL,
             expect=("{out}/eval.json",)),
    "python -m diffuse.evaluate ckpt=… judge=…/ar/last.ckpt steps=[8,16,32,64]":
        Tiny(replace=(("judge=…/ar/last.ckpt", "judge={ar_ckpt}"), ("ckpt=…", "ckpt={ckpt}")), extra=EVAL,
             expect=("{out}/eval.json", "{out}/sweep.json", "{out}/sweep.png")),
    "python -m diffuse.compare a=…/ar.ckpt b=…/diffusion.ckpt steps=[8,16,32,64]":
        Tiny(replace=(("…/ar.ckpt", "{ar_ckpt}"), ("…/diffusion.ckpt", "{ckpt}")), extra=EVAL,
             expect=("{out}/comparison.md", "{out}/comparison.json")),
    "python -m diffuse.train callbacks=analysis … && python -m diffuse.report --heatmap <run dir>":
        Tiny(replace=(("callbacks=analysis …", "callbacks=analysis"), ("<run dir>", "{out}")), extra=RUN,
             expect=(*TRAINED, "{out}/heatmap.png")),
    "python -m diffuse.export ckpt=…/last.ckpt out=exported/":
        Tiny(replace=(("…/last.ckpt", "{ckpt}"), ("out=exported/", "out={out}/exported/")),
             expect=("{out}/exported/model.safetensors", "{out}/exported/diffuse_config.json")),
    "python -m diffuse.export ckpt=…/ar/last.ckpt out=llama/ format=llama":
        Tiny(replace=(("…/ar/last.ckpt", "{ar_ckpt}"), ("out=llama/", "out={out}/llama/")),
             expect=("{out}/llama/config.json", "{out}/llama/model.safetensors")),
    "python -m diffuse.export ckpt=…/last.ckpt out=remote/ format=remote":
        Tiny(replace=(("…/last.ckpt", "{ckpt}"), ("out=remote/", "out={out}/remote/")),
             expect=("{out}/remote/config.json", "{out}/remote/modeling_diffuse.py")),
    # -- standard benchmarks
    "python -m diffuse.lm_eval ckpt=…/last.ckpt tasks=[arc_easy,piqa,wikitext] limit=200":
        Tiny(replace=(("…/last.ckpt", "{ckpt}"),
                      ("tasks=[arc_easy,piqa,wikitext]", "tasks=[diffuse_cloze] local_tasks={text} builtin_tasks=false")),
             extra=LM_EVAL, expect=LM_EVAL_FILES,
             note="lm-eval's tasks come from the hub: the same command on a local multiple-choice task, offline"),
    "python -m diffuse.lm_eval ckpt=…/last.ckpt tasks=[diffuse_cloze,diffuse_continue,diffuse_text] "
    "local_tasks=my_text.txt builtin_tasks=false":
        Tiny(replace=(("…/last.ckpt", "{ckpt}"), ("my_text.txt", "{text}")), extra=LM_EVAL, expect=LM_EVAL_FILES),
}


# -- fixtures: built on first use, once per session ---------------------------------------------------
WIKI_PARAGRAPH = ("The {w} of the {v} is a species of <unk> found in the {x} , known since 1 @,@ 800 . It is "
                  "closely related to the {v} and may grow to a length of 60 cm ( 24 in ) .")


def wikitext(path: Path, articles: int, seed: int) -> Path:
    """WikiText-2's raw layout: ` = Title = ` headings, paragraphs with a leading space, and blank lines that
    hold one space."""
    rng = random.Random(seed)
    words = "lobster river stone tree light harbour island castle".split()
    lines = [" "]
    for a in range(articles):
        lines += [f" = Article {a} {rng.choice(words)} = ", " "]
        for _ in range(3):
            lines += [" " + WIKI_PARAGRAPH.format(w=rng.choice(words), v=rng.choice(words), x=rng.choice(words)), " "]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Fixtures(dict):
    """`{name}` in a replacement: built on first use (format_map calls __missing__), then kept."""

    def __missing__(self, name: str) -> str:
        value = self[name] = str(getattr(self, f"build_{name}")())
        return value

    @staticmethod
    def build_text() -> Path:
        return write_corpus(BASE / "text.txt", paragraphs=200)

    @staticmethod
    def build_train_txt() -> Path:
        (BASE / "wiki").mkdir(exist_ok=True)
        return wikitext(BASE / "wiki" / "train.txt", articles=30, seed=0)

    @staticmethod
    def build_valid_txt() -> Path:
        (BASE / "wiki").mkdir(exist_ok=True)
        return wikitext(BASE / "wiki" / "valid.txt", articles=8, seed=1)

    @staticmethod
    def build_folder() -> Path:
        folder = BASE / "corpus"
        (folder / "notes").mkdir(parents=True)
        write_corpus(folder / "a.txt", paragraphs=60, seed=1)
        write_corpus(folder / "notes" / "b.md", paragraphs=60, seed=2)
        (folder / ".hidden.txt").write_text("never read\n")
        return folder

    @staticmethod
    def build_ckpt() -> str:
        from evaluation_runs import ckpt
        return ckpt("masked_discrete")

    @staticmethod
    def build_ar_ckpt() -> str:
        from evaluation_runs import ckpt
        return ckpt("autoregressive")

    @staticmethod
    def build_block_ckpt() -> Path:  # the README's own block-diffusion training run
        return run_command("python -m diffuse.train objective.block_size=16") / "checkpoints" / "last.ckpt"

    @staticmethod
    def build_multirun() -> Path:  # the README's own first sweep
        return run_command("python -m diffuse.train -m objective=masked_discrete,autoregressive schedule=linear,cosine")


FIXTURES = Fixtures()


class Fill(dict):
    """{out}: the command's output folder; any other {name}: a fixture."""

    def __missing__(self, name: str) -> str:
        return FIXTURES[name]


def out_dir(command: str) -> Path:
    return BASE / "runs" / f"{list(COMMANDS).index(command):02d}"


def runnable(command: str, how: Tiny) -> list[tuple[list[str], list[str]]]:
    """The README command with its placeholders replaced, as (argv, tiny overrides) per `&&`-joined command."""
    fill = Fill(out=str(out_dir(command)))
    text = command
    for old, new in how.replace:
        assert old in text, f"{old!r} is not in the README command {command!r}"
        text = text.replace(old, new.format_map(fill))
    parts = [(shlex.split(part), []) for part in text.split(" && ")]
    parts[0][1].extend(arg.format_map(fill) for arg in how.extra)
    return parts


def make_dry_run(argv: list[str]) -> list[str]:
    """`make train [ARGS=…]` → the python command make would run (`make -n`: nothing installed or run)."""
    # under `make test` this make is nested: without the outer make's variables (ARGS=… would leak in through
    # MAKEFLAGS) and its "make[1]: Leaving directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS")}
    done = subprocess.run(["make", "-n", "--no-print-directory", *argv[1:]], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    line = next(line for line in reversed(done.stdout.splitlines()) if " -m diffuse." in line)
    words = shlex.split(line)
    return ["python", *words[words.index("-m"):]]


OUTCOMES: dict[str, Path | BaseException] = {}


def run_command(command: str) -> Path:
    """Runs one README command tiny, once per session (its test, or a later command that reads its output), and
    returns its output folder; a failure is kept and raised again, not rerun into the folder it left."""
    if command not in OUTCOMES:
        try:
            OUTCOMES[command] = run_once(command)
        except BaseException as err:
            OUTCOMES[command] = err
            raise
    if isinstance(OUTCOMES[command], BaseException):
        raise OUTCOMES[command]
    return OUTCOMES[command]


def run_once(command: str) -> Path:
    how = COMMANDS[command]
    out = out_dir(command)
    stdout, failed = "", []
    for argv, extra in runnable(command, how):
        if argv[0] == "make":
            argv = make_dry_run(argv)
        assert argv[:2] == ["python", "-m"] and argv[2].startswith("diffuse."), argv
        module, args = argv[2], [*argv[3:], *extra]
        done = run_cli(module, *args, timeout=300) if how.cli else call_main(module, *args)
        if done.returncode != 0:  # the commands after a failed `&&` still run: every failure is reported
            failed.append(f"{shlex.join(['python', '-m', module, *args])}\n{done.stderr[-3000:]}")
        stdout += done.stdout
    assert not failed, "\n".join(failed)
    missing = [p for p in (e.format(out=out) for e in how.expect) if not Path(p).exists()]
    assert not missing, f"{command}: ran but left no {missing}"
    assert how.stdout in stdout, f"{command}: {how.stdout!r} not in its output:\n{stdout[-2000:]}"
    return out


# -- the tests --------------------------------------------------------------------------------------
def test_every_readme_command_is_listed():
    """A README edit that adds, drops or changes a command fails here until COMMANDS follows it."""
    shown = set(readme_commands())
    assert not shown - set(COMMANDS), f"README commands with no entry in COMMANDS: {sorted(shown - set(COMMANDS))}"
    assert not set(COMMANDS) - shown, f"COMMANDS entries the README no longer shows: {sorted(set(COMMANDS) - shown)}"


def test_extraction_reads_fences_and_inline_spans():
    text = ("```bash\npython -m diffuse.train a=1   # comment\n\n```\n```toml\nx = 1\n```\n"
            "Run `python -m diffuse.sample\n  ckpt=x` or `make train`, not `data=text` or `diffuse/x.py`.\n")
    assert readme_commands(text) == ["python -m diffuse.train a=1", "python -m diffuse.sample ckpt=x", "make train"]


@pytest.mark.parametrize("command", list(COMMANDS), ids=list(COMMANDS))  # the id is the README text
def test_readme_command(command):
    how = COMMANDS[command]
    if isinstance(how, Skip):
        pytest.skip(how.reason)
    run_command(command)
