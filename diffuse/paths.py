"""Where the Hydra configs are: inside the package when installed as a wheel (`diffuse/conf`),
at the repository's top level (`conf/`) in a checkout or an editable install."""

from pathlib import Path

_here = Path(__file__).resolve().parent
CONFIG_DIR = str(_here / "conf" if (_here / "conf" / "train.yaml").is_file() else _here.parent / "conf")
