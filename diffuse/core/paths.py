"""Where the Hydra configs are: inside the package when installed as a wheel (`diffuse/conf`),
at the repository's top level (`conf/`) in a checkout or an editable install, and in the `conf/`
folder of every installed plugin (diffuse/core/discovery.py), which Hydra learns of here."""

from pathlib import Path

from hydra.core.plugins import Plugins

from diffuse.core.discovery import PluginConfigs

_here = Path(__file__).resolve().parent.parent  # the diffuse package
CONFIG_DIR = str(_here / "conf" if (_here / "conf" / "train.yaml").is_file() else _here.parent / "conf")
Plugins.instance().register(PluginConfigs)
