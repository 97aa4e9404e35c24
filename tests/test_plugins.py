"""A new component is one module plus one yaml: proved in a copy of the tree and as an installed plugin.

Both train `objective=<new>` for 2 steps through the real CLI with nothing of diffuse edited.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import OFFLINE, REPO

# the new objective: next-token prediction with its own name and one knob of its own
OBJECTIVE_MODULE = textwrap.dedent('''
    """A contributor's objective: autoregressive NLL, halved (proves the knob reached it)."""
    from diffuse.objectives.autoregressive import Autoregressive
    from diffuse.registry import OBJECTIVES


    @OBJECTIVES.register("{name}")
    class HalfAR(Autoregressive):
        def __init__(self, special, scale: float = 1.0, schedule=None):
            super().__init__(special)
            self.scale = scale

        def loss(self, backbone, batch, generator=None, train=True):
            out = super().loss(backbone, batch, generator, train)
            out.loss = out.loss * self.scale
            out.metrics["scale"] = out.loss.new_tensor(self.scale)
            return out
''')
OBJECTIVE_YAML = "# a contributor's objective\nname: {name}\nscale: 0.5\n"


def train_two_steps(corpus: Path, run_dir: Path, name: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    args = ["debug=default", "data=text", f"data.path={corpus}", "tokenizer=byte", "num_samples=1",
            "trainer.max_steps=2", "trainer.val_check_interval=2", f"objective={name}", f"hydra.run.dir={run_dir}"]
    return subprocess.run([sys.executable, "-m", "diffuse.train", *args], cwd=cwd, env={**os.environ, **OFFLINE, **env},
                          capture_output=True, text=True, timeout=300)


def check_trained(proc, run_dir: Path) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/scale"] == 0.5  # the yaml's knob reached the new class
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "forward passes" in proc.stdout  # sampled with the objective's own sampler (ar)


def test_a_new_objective_in_a_copy_of_the_tree_needs_one_module_and_one_yaml(corpus, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "diffuse", tree / "diffuse", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", tree / "conf", ignore=shutil.ignore_patterns("__pycache__"))
    before = {p.relative_to(tree) for p in tree.rglob("*") if p.is_file()}
    (tree / "diffuse" / "objectives" / "half_ar.py").write_text(OBJECTIVE_MODULE.format(name="half_ar"))
    (tree / "conf" / "objective" / "half_ar.yaml").write_text(OBJECTIVE_YAML.format(name="half_ar"))
    after = {p.relative_to(tree) for p in tree.rglob("*") if p.is_file()}
    assert after - before == {Path("diffuse/objectives/half_ar.py"), Path("conf/objective/half_ar.yaml")}

    run_dir = tmp_path / "run"
    proc = train_two_steps(corpus, run_dir, "half_ar", cwd=tree, env={"PYTHONPATH": str(tree)})
    check_trained(proc, run_dir)
    # and the untouched repository does not know it (the copy was used, not the checkout)
    proc = train_two_steps(corpus, tmp_path / "run2", "half_ar", cwd=REPO, env={})
    assert proc.returncode != 0 and "half_ar" in proc.stderr


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """`pip install` of a tiny plugin package (its own objective + yaml, one entry point) into a folder."""
    src = tmp_path_factory.mktemp("plugin_src")
    pkg = src / "diffuse_demo_plugin"
    (pkg / "conf" / "objective").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from diffuse_demo_plugin import objective  # noqa: F401\n")
    (pkg / "objective.py").write_text(OBJECTIVE_MODULE.format(name="demo_half_ar"))
    (pkg / "conf" / "objective" / "demo_half_ar.yaml").write_text(OBJECTIVE_YAML.format(name="demo_half_ar"))
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "diffuse-demo-plugin"
        version = "0.0.1"

        [project.entry-points."diffuse.plugins"]
        demo = "diffuse_demo_plugin"

        [tool.setuptools]
        packages = ["diffuse_demo_plugin"]

        [tool.setuptools.package-data]
        diffuse_demo_plugin = ["conf/*/*.yaml"]
    '''))
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(src)  # only the installed copy remains
    return target


def test_an_installed_plugin_registers_through_its_entry_point(corpus, tmp_path, installed_plugin):
    assert list(installed_plugin.glob("diffuse_demo_plugin-*.dist-info/entry_points.txt"))
    run_dir = tmp_path / "run"
    proc = train_two_steps(corpus, run_dir, "demo_half_ar", cwd=tmp_path, env={"PYTHONPATH": str(installed_plugin)})
    check_trained(proc, run_dir)


def test_a_broken_plugin_is_named_in_one_line(tmp_path):
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[diffuse.plugins]\nbroken = broken_plugin\n")
    (site / "broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    code = "from diffuse.registry import OBJECTIVES; OBJECTIVES.names()"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **OFFLINE, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "plugin 'broken' (broken_plugin, entry point group diffuse.plugins) failed to import: RuntimeError: boom" in proc.stderr


def test_the_registry_is_a_leaf_and_discovery_runs_on_first_lookup():
    code = ("import sys; import diffuse.registry as r; "
            "assert not [m for m in sys.modules if m.startswith(('diffuse.objectives', 'diffuse.models', 'diffuse.sampling'))]; "
            "names = r.OBJECTIVES.names(); assert 'masked_discrete' in names and 'diffuse.objectives.llada' in sys.modules; "
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
