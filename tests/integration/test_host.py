"""The pinned ComfyUI host starts with the pack loaded, and the harness catches import failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from helpers import combo_options

from tools import comfy_host

CONTRACT_IDS = {
    "SD35FP8CheckpointLoader", "SD35FP8DiffusionModelLoader", "SD35FP8QuantizeModel", "SD35FP8QuantizeCLIP",
    "SD35FP8Sampler", "SD35FP8HardwareInfo", "SD35FP8CompareImages", "SD35FP8SaveModel",
}
REPO = Path(__file__).resolve().parents[2]


FRONTENDS = {"0.3.75": "1.32.9", "0.8.0": "1.35.9"}  # each host's own pinned frontend


def test_host_is_pinned_comfyui(comfy_dir, comfy_nodes):
    import comfy.model_management
    import comfyui_frontend_package
    import comfyui_version

    assert comfyui_version.__version__ == comfy_host.host_version()
    assert Path(comfyui_version.__file__).resolve().parent == comfy_dir.resolve()
    assert not (comfy_dir / "extra_model_paths.yaml").exists()
    frontend = Path(comfyui_frontend_package.__file__).resolve().parent.parent
    assert any(p.name == f"comfyui_frontend_package-{FRONTENDS[comfy_host.host_version()]}.dist-info"
               for p in frontend.iterdir())
    # FP8-device mode: the host takes the decisions of an FP8 GPU; otherwise those of the CPU it runs on
    assert comfy.model_management.supports_fp8_compute() is comfy_host.fp8_device_mode()


def test_pack_loads_with_all_nodes(comfy_nodes):
    assert CONTRACT_IDS <= set(comfy_nodes)
    assert "KSampler" in comfy_nodes and "SkipLayerGuidanceSD3" in comfy_nodes


def test_pack_import_failure_fails_the_harness(tmp_path, comfy_dir):
    """ComfyUI only logs a broken custom node; our harness must raise instead."""
    broken = tmp_path / "broken_pack"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('deliberately broken')\n")
    script = textwrap.dedent(f"""
        from tools import comfy_host
        base = comfy_host.make_base_dir({str(tmp_path / 'base')!r}, {str(broken)!r}, 'comfyui-sd35-fp8')
        comfy_host.boot({str(comfy_dir)!r}, base)
        try:
            comfy_host.load_nodes({str(broken)!r})
        except comfy_host.CustomNodeImportError as e:
            print('CAUGHT', 'deliberately broken' in str(e))
        else:
            print('NOT CAUGHT')
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "CAUGHT True" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


_LOAD_LIKE_THE_DEMO = """
import logging
import sys
from pathlib import Path
from tools import comfy_host
logging.basicConfig(level=logging.WARNING)  # ComfyUI's log on stderr
checkout = Path.cwd()
base = comfy_host.make_base_dir(checkout.parent / "base", checkout)
(base / "custom_nodes" / "broken-beside-comfyui-sd35-fp8").mkdir()
(base / "custom_nodes" / "broken-beside-comfyui-sd35-fp8" / "__init__.py").write_text("raise ImportError('not ours')")
comfy_host.activate_overlay(checkout / ".cache", comfy_host.host_version())
comfy_host.boot(comfy_host.materialise(checkout / ".cache"), base)
mappings = comfy_host.load_nodes()
print(sys.modules["sd35_fp8"].__file__)
print(",".join(sorted(k for k in mappings if k.startswith("SD35FP8"))))
"""


@pytest.mark.skipif(comfy_host.fp8_device_mode(), reason="folder names do not change in FP8-device mode")
@pytest.mark.parametrize("folder", ["comfyui-sd35-fp8", "another-name"])
def test_a_checkout_loads_the_pack_whatever_its_folder_is_named(tmp_path, comfy_dir, folder):
    """A checkout in a folder named as `git clone` names it (or any other name), its host unpacked in its own .cache/
    as `make` does, loads the pack the way the demo and the tests do. ComfyUI logs failures of modules that are not
    the pack: the host's optional built-in nodes (their paths inside the checkout carry its folder name) and a broken
    custom node whose name contains the pack's."""
    checkout = tmp_path / folder
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv*", ".cache", "demo-output", "test-artifacts", "build", "__pycache__"))
    shutil.copytree(comfy_dir, checkout / ".cache" / comfy_dir.name, copy_function=os.link,
                    ignore=shutil.ignore_patterns("__pycache__"))
    overlay = comfy_dir.parent / f"site-{comfy_host.host_version()}"
    if overlay.exists():  # the packages 0.8.0 pins apart from the venv, as `make hosts` installs them
        (checkout / ".cache" / overlay.name).symlink_to(overlay, target_is_directory=True)
    done = subprocess.run([sys.executable, "-c", _LOAD_LIKE_THE_DEMO], cwd=checkout, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    where, ids = done.stdout.splitlines()[-2:]
    assert where == str(checkout / "__init__.py")
    assert set(ids.split(",")) == CONTRACT_IDS
    assert "not ours" in done.stderr  # ComfyUI did log the neighbour's failure; the harness did not take it for ours


def test_http_server_starts_and_lists_our_nodes(tmp_path, comfy_dir, comfy_base):
    server = comfy_host.ServerProcess(comfy_dir, comfy_base, tmp_path / "server.log")
    server.start()
    try:
        with urllib.request.urlopen(server.url + "/object_info", timeout=60) as r:
            info = json.loads(r.read())
        assert CONTRACT_IDS <= set(info)
        assert info["SD35FP8Sampler"]["category"] == "SD3.5 FP8/sampling"
        assert info["SD35FP8CheckpointLoader"]["display_name"] == "Load SD3.5 Checkpoint (FP8)"
        ckpt_names = combo_options(info["SD35FP8CheckpointLoader"]["input"]["required"]["ckpt_name"])
        assert "tiny_sd35_large.safetensors" in ckpt_names
        # V3 nodes; the frontend extension and a help page per node are served from web/
        assert all(info[node_id].get("python_module", "").endswith("comfyui-sd35-fp8") for node_id in CONTRACT_IDS)
        with urllib.request.urlopen(server.url + "/extensions", timeout=30) as r:
            assert "/extensions/comfyui-sd35-fp8/sd35_fp8.js" in json.loads(r.read())
        for node_id in sorted(CONTRACT_IDS):
            with urllib.request.urlopen(f"{server.url}/extensions/comfyui-sd35-fp8/docs/{node_id}.md", timeout=30) as r:
                page = r.read().decode()
            assert page.startswith(f"# {info[node_id]['display_name']}\n") and "## Inputs" in page, node_id
        assert not comfy_host.pack_import_failures(server.log_text().splitlines(), REPO)
    finally:
        server.stop()
    assert server.proc.poll() is not None
