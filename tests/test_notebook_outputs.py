"""The stored notebooks carry no machine paths (a virtualenv, a home or scratch directory).

Stored outputs are what readers see on GitHub; a warning printed by a package installed in
a local virtualenv (e.g. tqdm's ``IProgress not found``) would publish that path. The check
reads the files as stored, without executing them.
"""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MACHINE_PATHS = ("/work/", "/home/", "/tmp/", ".venv", "site-packages")


def places(path: Path) -> list[str]:
    """Where ``path`` mentions a machine path: ``metadata`` or ``cell i (kind)``."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    parts = [("metadata", nb.get("metadata", {}))]
    parts += [(f"cell {i} ({cell['cell_type']})", cell) for i, cell in enumerate(nb["cells"])]
    found = []
    for where, part in parts:
        text = json.dumps(part, ensure_ascii=False)
        found += [f"{where}: {needle!r}" for needle in MACHINE_PATHS if needle in text]
    return found


def test_notebooks_found():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_no_machine_paths(path):
    text = path.read_text(encoding="utf-8")
    found = [needle for needle in MACHINE_PATHS if needle in text]
    assert not found, f"{path.name} mentions {found} at {places(path)}"
