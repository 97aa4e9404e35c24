"""Loading a checkpoint runs no code: every entry point unpickles with weights_only=True, refuses a file
that needs more in one line naming it, and loads a trusted legacy file only with DIFFUSE_TRUST_CHECKPOINTS=1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import call_main, error_lines
from diffuse.run.checkpoint import TRUST_ENV, AtomicCheckpointIO
from diffuse.errors import DiffuseError


class Payload:
    """Unpickled, it runs `exec` and writes the marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('the payload ran')",))


@pytest.fixture(scope="module")
def planted(debug_run, tmp_path_factory):
    """(payload checkpoint, marker, legacy checkpoint): the session's real debug checkpoint with a payload
    hidden deep inside (a callback's state), and with an OmegaConf object in it (a trusted legacy file)."""
    folder = tmp_path_factory.mktemp("planted")
    marker = folder / "MARKER"
    ckpt = torch.load(debug_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["callbacks"][next(iter(ckpt["callbacks"]))]["note"] = Payload(marker)
    torch.save(ckpt, folder / "payload.ckpt")
    legacy = torch.load(debug_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    legacy["hyper_parameters"] = OmegaConf.create({"written_by": "an older diffuse"})
    torch.save(legacy, folder / "legacy.ckpt")
    return folder / "payload.ckpt", marker, folder / "legacy.ckpt"


def assert_refused(result, path: Path, marker: Path):
    assert not marker.exists(), "the payload ran"
    assert result.returncode not in (0, None), result
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and str(path) in lines[0] and "unsafe" in lines[0] and TRUST_ENV in lines[0], result


def test_every_checkpoint_diffuse_writes_loads_with_weights_only(debug_run):
    written = sorted((debug_run / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in written} >= {"last.ckpt", "best.ckpt"}
    for path in written:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["state_dict"] and ckpt["diffuse"]["config"] and ckpt["diffuse"]["tokenizer"]


def test_the_payload_is_real(planted):
    """Guard for the tests below: unpickled in full, the planted file does run its code."""
    payload, marker, _ = planted
    marker.unlink(missing_ok=True)
    torch.load(payload, map_location="cpu", weights_only=False)
    assert marker.read_text() == "the payload ran"
    marker.unlink()


ENTRY_POINTS = {
    # name: (module, args given the payload and a good checkpoint, the run dir)
    "sample": ("diffuse.sample", lambda p, good, d: [f"ckpt={p}", "num_samples=1", "length=8"]),
    "evaluate": ("diffuse.evaluate", lambda p, good, d: [f"ckpt={p}", "progress=false"]),
    "evaluate judge=": ("diffuse.evaluate", lambda p, good, d: [f"ckpt={good}", f"judge={p}", "progress=false"]),
    "export": ("diffuse.export", lambda p, good, d: [f"ckpt={p}", f"out={d / 'exported'}"]),
    "compare a=": ("diffuse.compare", lambda p, good, d: [f"a={p}", f"b={good}", "progress=false"]),
    "compare b=": ("diffuse.compare", lambda p, good, d: [f"a={good}", f"b={p}", "progress=false"]),
    "train ckpt_path=": ("diffuse.train", lambda p, good, d: ["debug=default", "num_samples=0", f"ckpt_path={p}"]),
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_a_payload_checkpoint_is_refused_by_every_entry_point(name, planted, debug_run, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    payload, marker, _ = planted
    marker.unlink(missing_ok=True)
    module, args = ENTRY_POINTS[name]
    good = debug_run / "checkpoints" / "last.ckpt"
    result = call_main(module, *args(payload, good, tmp_path), f"hydra.run.dir={tmp_path / 'run'}")
    assert_refused(result, payload, marker)


def test_a_payload_as_the_last_checkpoint_of_a_resumed_run_is_refused(planted, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    payload, marker, _ = planted
    marker.unlink(missing_ok=True)
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(payload, tmp_path / "checkpoints" / "last.ckpt")
    result = call_main("diffuse.train", "debug=default", "num_samples=0", "resume=true", f"hydra.run.dir={tmp_path}")
    assert_refused(result, tmp_path / "checkpoints" / "last.ckpt", marker)


def test_lightnings_resume_reads_through_weights_only(planted, debug_run, monkeypatch):
    """The checkpoint_io plugin train.py hands the Trainer: Lightning's resume loads through it."""
    monkeypatch.delenv(TRUST_ENV, raising=False)
    payload, marker, _ = planted
    marker.unlink(missing_ok=True)
    io = AtomicCheckpointIO()
    with pytest.raises(DiffuseError, match="unsafe unpickling") as err:
        io.load_checkpoint(payload, weights_only=False)  # Lightning's own argument does not opt out
    assert str(payload) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    assert io.load_checkpoint(debug_run / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_a_trusted_legacy_file_loads_only_with_the_opt_in(planted, tmp_path, monkeypatch):
    _, marker, legacy = planted
    monkeypatch.delenv(TRUST_ENV, raising=False)
    refused = call_main("diffuse.sample", f"ckpt={legacy}", "num_samples=1", "length=8", f"hydra.run.dir={tmp_path / 's0'}")
    lines = error_lines(refused.stderr)
    assert refused.returncode == 2 and len(lines) == 1 and str(legacy) in lines[0], refused
    assert "omegaconf.dictconfig.DictConfig" in lines[0] and TRUST_ENV in lines[0]

    monkeypatch.setenv(TRUST_ENV, "1")
    sampled = call_main("diffuse.sample", f"ckpt={legacy}", "num_samples=1", "length=8", f"hydra.run.dir={tmp_path / 's1'}")
    assert sampled.returncode == 0 and (tmp_path / "s1" / "samples.jsonl").is_file(), sampled
    assert OmegaConf.is_config(AtomicCheckpointIO().load_checkpoint(legacy)["hyper_parameters"])
    # train ckpt_path= reads it twice: diffuse (tokenizer, fit check), then Lightning's resume (one more step)
    resumed = call_main("diffuse.train", "debug=default", "num_samples=0", f"ckpt_path={legacy}", "trainer.max_steps=6",
                        f"hydra.run.dir={tmp_path / 't'}")
    assert resumed.returncode == 0, resumed
    assert torch.load(tmp_path / "t" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not marker.exists()
