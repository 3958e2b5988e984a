"""Every Python block of README.md runs as written, in order, in a fresh interpreter."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks, dedented (blocks inside list items are indented)."""
    pattern = re.compile(r"^( *)```python\n(.*?)^\1```$", re.M | re.S)
    return [textwrap.dedent(body) for _, body in pattern.findall(text)]


def test_readme_has_the_three_uses():
    code = "\n".join(python_blocks(README.read_text()))
    for needle in ("MCMC(NUTS(", "optax.adam", "jax.vmap(", "GridGP(", "KroneckerNormal("):
        assert needle in code, needle


def test_readme_blocks_run_in_order(tmp_path):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 8
    script = "\n\n".join(f"# --- README block {i}\n{b}" for i, b in enumerate(blocks))
    path = tmp_path / "readme_blocks.py"
    path.write_text(script)
    done = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "(40, 20) (40, 20) (100, 40, 20)" in done.stdout
