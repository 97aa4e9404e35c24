# The Hydra configs live at the repository's top level (conf/) and ship inside the wheel as the
# package `diffuse.conf`, so `python -m diffuse.train` finds them from a checkout and from a wheel.
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["diffuse", "diffuse.*"]) + ["diffuse.conf"],
    package_dir={"diffuse.conf": "conf"},
    package_data={"diffuse.conf": ["*.yaml", "**/*.yaml"]},
)
