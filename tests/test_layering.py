"""The package's import graph keeps the layering of CONTRIBUTING.md (drawn from the source)."""

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"


def test_imports_point_down_the_layers_without_cycles():
    result = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "model.vit" in result.stdout  # it did read the package


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    sys.path.insert(0, str(TOOL.parent))
    try:
        import import_graph
    finally:
        sys.path.pop(0)
    internal = {"model.vit": {"services.predict"}, "services.predict": set()}
    external = {"services.predict": {"rich"}, "model.vit": {"torch"}}
    problems = import_graph.check(internal, external)
    assert any("model may not import services" in p for p in problems)
    assert any("services.predict imports rich" in p for p in problems)
    cyclic = import_graph.check({"data.a": {"data.b"}, "data.b": {"data.a"}}, {})
    assert any(p.startswith("cycle:") for p in cyclic)
