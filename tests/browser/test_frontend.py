"""The real ComfyUI frontend (comfyui-frontend-package) in headless Debian chromium, with our nodes.

Loads every shipped UI workflow into the page, checks the frontend knows every node type (no
missing nodes) and lists ours under their categories, then queues the txt2img workflow from the
page and waits for its image in the server's history. Screenshots go to test-artifacts/browser/.

The README's picture (docs/images/ab_compare_graph.png) is this module's screenshot of the A/B workflow on
ComfyUI 0.8.0, stamped with a hash of what it shows (the workflow file and web/*.js); a test fails while the
committed picture's stamp is not the current one. Pixels are not compared (fonts and rendering vary between
machines); the stamp says whether the picture shows the current graph. Test runs never write the tracked file; to
refresh it: `REFRESH_README_PICTURE=1 COMFY_HOST=0.8.0 .venv/bin/python -m pytest tests/browser -k "ab_compare or
readme_picture"`, then commit it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from tools import comfy_host

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
CONTRACT = {"SD35FP8CheckpointLoader", "SD35FP8DiffusionModelLoader", "SD35FP8QuantizeModel", "SD35FP8QuantizeCLIP",
            "SD35FP8Sampler", "SD35FP8HardwareInfo", "SD35FP8CompareImages", "SD35FP8SaveModel"}
UI_WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
README_PICTURE = REPO / "docs" / "images" / "ab_compare_graph.png"
README_WORKFLOW = REPO / "workflows" / "sd35_fp8_ab_compare.json"
README_HOST = "0.8.0"  # the picture shows the newest tested host's frontend
STAMP_KEY = "sd35_fp8:shows"


def picture_stamp() -> str:
    """What the README's picture shows: the workflow file (nodes, widget values, layout) and the web/*.js code."""
    digest = hashlib.sha256(README_WORKFLOW.read_bytes())
    for js in sorted((REPO / "web").glob("*.js")):
        digest.update(js.read_bytes())
    return digest.hexdigest()


def save_readme_picture(screenshot: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text(STAMP_KEY, picture_stamp())
    info.add_text("sd35_fp8:host", comfy_host.host_label())
    Image.open(screenshot).save(README_PICTURE, pnginfo=info, optimize=True)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(comfy_dir, comfy_base, tmp_path_factory):
    log = tmp_path_factory.mktemp("browser") / "server.log"
    proc = comfy_host.ServerProcess(comfy_dir, comfy_base, log).start()
    # a returning user: no first-run templates browser over the canvas
    request = urllib.request.Request(proc.url + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run `make browser` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 2400, "height": 1300})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph "
                               "&& Object.keys(LiteGraph.registered_node_types).length > 100", timeout=120_000)
        page.page_errors = errors
        yield page
        context.close()


def test_our_nodes_are_in_the_node_library(page):
    info = page.evaluate("""() => Object.fromEntries(Object.entries(LiteGraph.registered_node_types)
        .filter(([k]) => k.startsWith('SD35FP8'))
        .map(([k, v]) => [k, {title: v.title, category: v.category || (v.nodeData && v.nodeData.category)}]))""")
    assert set(info) == CONTRACT
    assert info["SD35FP8CheckpointLoader"]["title"] == "Load SD3.5 Checkpoint (FP8)"
    assert all(v["category"].startswith("SD3.5 FP8/") for v in info.values()), info


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_loads_without_missing_nodes(page, path):
    workflow = json.loads(path.read_text())
    result = page.evaluate("""async (wf) => {
        await window.app.loadGraphData(wf, true, true, 'test');
        const registered = LiteGraph.registered_node_types;
        const nodes = window.app.graph._nodes;
        return {
            missing: [...new Set(wf.nodes.map(n => n.type))].filter(t => !(t in registered)),
            loaded: nodes.length,
            broken: nodes.filter(n => n.has_errors).map(n => n.type),
            widgets: Object.fromEntries(nodes.map(n => [n.id, (n.widgets || []).map(w => w.value)])),
        };
    }""", workflow)
    assert result["missing"] == [] and result["broken"] == []
    assert result["loaded"] == len(workflow["nodes"])
    for node in workflow["nodes"]:  # every widget value landed where the file put it
        assert result["widgets"][str(node["id"])][: len(node["widgets_values"])] == node["widgets_values"], node["type"]
    page.mouse.click(2300, 1200)  # focus the canvas, then "." fits the view to all nodes
    page.keyboard.press(".")
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
    refresh = os.environ.get("REFRESH_README_PICTURE")
    if refresh and path == README_WORKFLOW and comfy_host.host_version() == README_HOST:
        save_readme_picture(ARTIFACTS / f"{path.stem}.png")


def test_readme_picture_shows_the_current_workflow():
    """The committed picture shows the current graph (after the screenshots above, which refresh it on request)."""
    recorded = Image.open(README_PICTURE).text.get(STAMP_KEY)
    assert recorded == picture_stamp(), (
        f"{README_PICTURE.relative_to(REPO)} does not show the current {README_WORKFLOW.name} / web/*.js: run "
        f"REFRESH_README_PICTURE=1 COMFY_HOST={README_HOST} .venv/bin/python -m pytest tests/browser -k "
        f"'ab_compare or readme_picture', and commit the picture")


def _history(server) -> dict:
    with urllib.request.urlopen(server.url + "/history", timeout=10) as r:
        return json.loads(r.read())


def test_queue_txt2img_from_the_page(page, server, fixture_files):
    workflow = json.loads((REPO / "workflows" / "sd35_fp8_txt2img.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "SD35FP8CheckpointLoader":
            node["widgets_values"][0] = fixture_files["large_all_in_one"].name
        if node["type"] == "EmptySD3LatentImage":
            node["widgets_values"][:2] = [64, 64]
    before = set(_history(server))
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf, true, true, 'txt2img'); "
                  "await window.app.queuePrompt(0, 1); }", workflow)
    deadline = time.monotonic() + 300
    entry = None
    while time.monotonic() < deadline:
        new = {k: v for k, v in _history(server).items() if k not in before}
        if new and all(v.get("status", {}).get("completed") is not None for v in new.values()):
            entry = next(iter(new.values()))
            break
        time.sleep(1)
    assert entry is not None, "the prompt queued from the page did not finish in 300 s"
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images and images[0]["filename"].startswith("txt2img")
    page.wait_for_timeout(1000)
    page.screenshot(path=str(ARTIFACTS / "txt2img_queued.png"))
    assert not [e for e in page.page_errors if "SD35FP8" in e]


def test_picking_a_sampler_preset_fills_its_widgets(page, server):
    """What the graph shows is what runs: the preset's values land in the sampler's widgets (web/sd35_fp8.js)."""
    with urllib.request.urlopen(server.url + "/object_info/SD35FP8Sampler", timeout=30) as r:
        presets = json.loads(r.read())["SD35FP8Sampler"]["input"]["required"]["preset"][1]["sd35_fp8_presets"]
    assert set(presets) == {"sd35_large", "sd35_medium", "sd35_large_turbo"}
    shown = page.evaluate("""(names) => {
        window.app.graph.clear();
        const node = LiteGraph.createNode('SD35FP8Sampler');
        window.app.graph.add(node);
        const widget = (name) => node.widgets.find(w => w.name === name);
        const out = {};
        for (const preset of names) {
            widget('preset').value = preset;        // what a pick in the combo does: set, then call back
            widget('preset').callback(preset);
            out[preset] = Object.fromEntries(node.widgets.map(w => [w.name, w.value]));
        }
        widget('steps').value = 7;
        widget('preset').value = 'custom';
        widget('preset').callback('custom');
        out.custom = Object.fromEntries(node.widgets.map(w => [w.name, w.value]));
        return out;
    }""", [*presets])
    for name, values in presets.items():
        assert {k: shown[name][k] for k in values} == values, name
    assert shown["custom"]["steps"] == 7  # custom leaves the widgets as they are
    assert not [e for e in page.page_errors if "sd35_fp8" in e.lower()]
