"""The server's layers show in its folders and are kept: each subpackage imports only the layers
below it (core <- models <- compute <- dataplane <- frontends <- process; ops beside them, used
by compute, the data plane and the front-ends), and core imports neither TensorFlow nor gRPC.

Read from the source with ``ast`` (type-only imports under ``if TYPE_CHECKING:`` included), so a
new upward import fails here before it becomes a cycle."""
from __future__ import annotations

import ast
import pathlib

import pytest

SERVER = pathlib.Path(__file__).resolve().parents[2] / "server" / "gradserve" / "server"
PREFIX = "gradserve.server."

#: What each layer may import from the server package (besides itself, config and core).
ALLOWED = {
    "core": set(),
    "models": set(),
    "compute": {"models", "ops"},
    "ops": {"models"},
    "dataplane": {"models", "compute", "ops"},
    "frontends": {"dataplane", "ops", "models"},
    "process": {"frontends", "dataplane", "compute", "models", "ops"},
}
#: Third-party packages the plain types must not import.
HEAVY = ("tensorflow", "keras", "grpc", "grpc_health", "grpc_reflection", "ai_edge_litert")


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules(layer: str) -> list[pathlib.Path]:
    return sorted((SERVER / layer).rglob("*.py"))


def test_the_top_of_the_server_package_holds_few_modules() -> None:
    top = sorted(p.name for p in SERVER.glob("*.py"))
    assert len(top) <= 8, top
    assert {p.name for p in SERVER.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(ALLOWED)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = []
    for path in _modules(layer):
        for name in _imports(path):
            if not name.startswith(PREFIX):
                continue
            other = name[len(PREFIX):].split(".")[0]
            if other in ALLOWED and other not in ALLOWED[layer] | {layer, "core"}:
                wrong.append(f"{path.relative_to(SERVER)} imports {name}")
    assert not wrong, wrong


def test_core_imports_neither_tensorflow_nor_grpc() -> None:
    wrong = [f"{path.name} imports {name}" for path in _modules("core") for name in _imports(path)
             if name.split(".")[0] in HEAVY]
    assert not wrong, wrong
