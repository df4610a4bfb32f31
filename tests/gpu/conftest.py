"""The GPU tests build ComfyUI's own MMDiT (`tools.tiny_sd35.build_mmdit`) without booting a host: its source on
the path is enough (the GPU session materialises ComfyUI 0.8.0 from `.gpu/`, as `make hosts` does here)."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def comfy_importable(comfy_dir):
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
