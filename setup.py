"""Package discovery for the two source folders: client/gradserve/ is `gradserve`,
server/gradserve/server/ is `gradserve.server` (folder names are import names, so type checkers
and editors follow imports without a map). Everything else (metadata, dependencies, package
data) is in pyproject.toml.

Every folder with an ``__init__.py`` below those two goes in the wheel, so a new subpackage
cannot be left out by a hand-written list; tests/, bench/ and tools/ never do.
"""
from setuptools import find_packages, setup

ROOTS = {"gradserve": "client/gradserve", "gradserve.server": "server/gradserve/server"}

setup(
    package_dir=ROOTS,
    packages=[name for package, folder in ROOTS.items()
              for name in [package, *(f"{package}.{sub}" for sub in find_packages(folder))]],
)
