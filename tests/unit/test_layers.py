"""The package tree's shape: imports point only down the layers pyproject.toml names, and no module imports itself
back through others."""

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]


def test_the_layers_contract_holds():
    """import-linter's `layers` contract in pyproject.toml: an upward import fails here."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def test_no_module_imports_itself_back():
    graph = grimp.build_graph("server")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain is not None and not module.startswith(imported + ".") and not imported.startswith(module + "."):
                cycles.append((module, *chain))
    assert cycles == []
