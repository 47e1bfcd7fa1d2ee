"""The benchmarks import the server's modules inside functions (they run for many minutes before reaching some):
every such import must still name something that exists, or a benchmark fails only when it is run."""

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

LOADTEST = Path(__file__).resolve().parents[3] / "loadtest"


def _imports() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(LOADTEST.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("server", "loadtest"):
                found += [(path.name, node.module, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("where,module,name", _imports())
def test_every_import_of_a_benchmark_resolves(where, module, name):
    found = hasattr(importlib.import_module(module), name) or importlib.util.find_spec(f"{module}.{name}")
    assert found, f"{where}: {module} has no {name}"
