"""Where components come from: the one place that imports the families.

Built-ins: every module of the family packages below is imported, so a new component is one module
(with its `@REGISTRY.register("name")`) plus one yaml in its config group; no import list to edit.
Plugins: every installed distribution may declare entry points in the group `diffuse.plugins`; each
names a module that is imported the same way. If that module is a package holding a `conf/` folder,
the folder joins Hydra's config search path, so the plugin's yamls are selectable like built-in ones
(`objective=<plugin's name>`): `PluginConfigs` below is a Hydra `SearchPathPlugin`, registered
with Hydra by diffuse/core/paths.py (`Plugins.instance().register`), which every Hydra command
imports for its CONFIG_DIR. Nothing in diffuse is edited.

    # a plugin's pyproject.toml
    [project.entry-points."diffuse.plugins"]
    my_plugin = "my_plugin"          # my_plugin/__init__.py registers; my_plugin/conf/objective/x.yaml

The registries call `discover()` on their first lookup (diffuse/registry.py); it runs once.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pkgutil
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from diffuse.errors import DiffuseError

log = logging.getLogger("diffuse")

PLUGIN_GROUP = "diffuse.plugins"
# the families' homes: packages are walked module by module; schedules is a single module
FAMILY_PACKAGES = ("diffuse.models", "diffuse.objectives", "diffuse.regularizers", "diffuse.sampling",
                   "diffuse.schedules", "diffuse.data", "diffuse.distillation")


def family_modules() -> list[str]:
    """Every module of the family packages, in a stable order."""
    names = []
    for package in FAMILY_PACKAGES:
        spec = importlib.util.find_spec(package)
        names.append(package)
        if spec is not None and spec.submodule_search_locations:
            names += sorted(m.name for m in pkgutil.walk_packages(spec.submodule_search_locations, package + "."))
    return names


def plugin_entry_points() -> list[EntryPoint]:
    return sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name)


def plugin_config_dirs() -> list[Path]:
    """The `conf/` folders of installed plugin packages (found without importing them)."""
    dirs = []
    for ep in plugin_entry_points():
        spec = importlib.util.find_spec(ep.module)
        for location in (spec.submodule_search_locations or []) if spec else []:
            if (Path(location) / "conf").is_dir():
                dirs.append(Path(location) / "conf")
    return dirs


class PluginConfigs(SearchPathPlugin):
    """Hydra search-path plugin: each installed plugin's `conf/` after diffuse's own configs."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for folder in plugin_config_dirs():
            search_path.append(provider=f"diffuse-plugin:{folder.parent.name}", path=f"file://{folder}")


def discover() -> None:
    for name in family_modules():
        importlib.import_module(name)
    for ep in plugin_entry_points():
        try:
            ep.load()
        except Exception as err:  # a broken plugin is named, not a traceback from deep inside importlib
            raise DiffuseError(f"plugin '{ep.name}' ({ep.value}, entry point group {PLUGIN_GROUP}) failed to "
                               f"import: {type(err).__name__}: {err}") from err
        log.debug("loaded plugin %s (%s)", ep.name, ep.value)
