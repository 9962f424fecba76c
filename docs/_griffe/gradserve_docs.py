"""Griffe extensions for the API reference (mkdocs.yml, ``plugins.mkdocstrings.handlers.python``).

Static analysis only: nothing here imports gradserve, TensorFlow or gRPC.

- ``SplitPackage``: the import package ``gradserve`` lives in two folders (setup.py's
  ``package_dir``): ``client/gradserve`` holds ``gradserve`` itself and ``server/gradserve/server``
  holds ``gradserve.server``. Griffe takes the first regular package it finds on its search paths
  (``client``) and never looks into the others, so this extension mounts the subpackages it finds
  under ``<other search path>/gradserve/`` into the loaded package, as Python's import system sees
  them once installed.
- ``CommentDocstrings``: the configuration dataclasses document their fields with ``#:`` comments
  above each field (Sphinx's convention); griffe reads only string docstrings, so this extension
  turns those comments into the fields' docstrings.

The extension classes are loaded by file path (``docs/_griffe/gradserve_docs.py:SplitPackage``),
so they subclass ``griffe.Extension`` and use only its public objects, plus the loader's
``_load_module``, the one way griffe offers to load a package under a parent.
"""
from __future__ import annotations

import pathlib
from typing import Any

import griffe


class SplitPackage(griffe.Extension):
    """Mount ``<search path>/<package>/<sub>`` of every other search path as ``<package>.<sub>``."""

    def __init__(self, packages: list[str] | None = None) -> None:
        super().__init__()
        self.packages = set(packages or ["gradserve"])

    def on_package(self, *, pkg: Any, loader: Any, **kwargs: Any) -> None:
        if pkg.name not in self.packages or pkg.filepath is None or isinstance(pkg.filepath, list):
            return
        home = pathlib.Path(pkg.filepath).resolve().parent
        for search_path in loader.finder.search_paths:
            folder = (pathlib.Path(search_path) / pkg.name).resolve()
            if folder == home or not folder.is_dir():
                continue
            for sub in sorted(folder.iterdir()):
                init = sub / "__init__.py"
                if not init.is_file() or sub.name in pkg.members:
                    continue
                module = loader._load_module(sub.name, init, submodules=True, parent=pkg)
                pkg.set_member(sub.name, module)
                loader.expand_exports(module)
                loader.expand_wildcards(module, external=False)

    # griffe < 1.14 calls its package hook on_package_loaded; mounting twice is a no-op.
    on_package_loaded = on_package


class CommentDocstrings(griffe.Extension):
    """Attributes without a docstring get the ``#:`` comment lines right above them, if any."""

    def on_package(self, *, pkg: Any, loader: Any, **kwargs: Any) -> None:
        sources: dict[pathlib.Path, list[str]] = {}
        self._visit(pkg, loader, sources, set())

    on_package_loaded = on_package

    def _visit(self, obj: Any, loader: Any, sources: dict[pathlib.Path, list[str]], seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        for member in list(obj.members.values()):
            if member.is_alias:
                continue
            if member.is_attribute and member.docstring is None:
                self._document(member, loader, sources)
            elif member.is_module or member.is_class:
                self._visit(member, loader, sources, seen)

    @staticmethod
    def _document(attr: Any, loader: Any, sources: dict[pathlib.Path, list[str]]) -> None:
        if attr.lineno is None or attr.filepath is None or isinstance(attr.filepath, list):
            return
        path = pathlib.Path(attr.filepath)
        if path not in sources:
            sources[path] = path.read_text(encoding="utf-8").splitlines()
        lines, comment = sources[path], []
        i = attr.lineno - 2
        if i >= len(lines):   # a line of a stub file (.pyi) merged into its module
            return
        while i >= 0 and lines[i].strip().startswith("#:"):
            comment.insert(0, lines[i].strip()[2:].strip())
            i -= 1
        if comment:
            attr.docstring = griffe.Docstring(" ".join(comment), lineno=i + 2, endlineno=attr.lineno - 1,
                                              parent=attr, parser=loader.docstring_parser,
                                              parser_options=loader.docstring_options)


__all__ = ["SplitPackage", "CommentDocstrings"]
