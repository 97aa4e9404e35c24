"""Puts the `conf/` folder of every installed diffuse plugin (entry point group `diffuse.plugins`) on
Hydra's config search path, so a plugin's yamls compose like built-in ones. Hydra finds this class
itself: it scans the `hydra_plugins` namespace package for plugins."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class DiffusePluginConfigs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from diffuse.discovery import plugin_config_dirs

        for folder in plugin_config_dirs():
            search_path.append(provider=f"diffuse-plugin:{folder.parent.name}", path=f"file://{folder}")
