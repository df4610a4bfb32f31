"""pytest plugin: collect the repo root as a plain directory, not as a Python package.

The root is a ComfyUI custom node package whose __init__.py imports comfy (only the test host
provides it); pytest would otherwise import it while collecting tests/.
"""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path: Path, parent):
    if path == REPO:
        return pytest.Dir.from_parent(parent, path=path)
