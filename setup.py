"""Package discovery for the two source folders: client/ is `gradserve`, server/ is
`gradserve.server`. Everything else (metadata, dependencies, package data) is in pyproject.toml.

Every folder with an ``__init__.py`` below client/ or server/ goes in the wheel, so a new
subpackage cannot be left out by a hand-written list; tests/, bench/ and tools/ never do.
"""
from setuptools import find_packages, setup

ROOTS = {"gradserve": "client", "gradserve.server": "server"}

setup(
    package_dir=ROOTS,
    packages=[name for package, folder in ROOTS.items()
              for name in [package, *(f"{package}.{sub}" for sub in find_packages(folder))]],
)
