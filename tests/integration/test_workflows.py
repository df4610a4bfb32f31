"""The shipped workflows: API and UI forms agree, every node/widget exists, every API graph runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import comfy_host
from tools.make_workflows import node_definitions, render_all, widget_count

REPO = Path(__file__).resolve().parents[2]
API = sorted((REPO / "workflows" / "api").glob("*.json"))
UI = sorted((REPO / "workflows").glob("*.json"))
OFFICIAL = {"sd3.5_large.safetensors": "large", "sd3.5_medium.safetensors": "medium",
            "sd3.5_large_turbo.safetensors": "large_turbo"}


@pytest.fixture(scope="module")
def defs(comfy_nodes) -> dict:
    import nodes

    return node_definitions(nodes.NODE_CLASS_MAPPINGS)


def test_eight_workflows_in_both_forms():
    assert len(API) >= 8 and [p.name for p in API] == [p.name for p in UI]


def test_files_match_their_source(defs):
    """UI files are generated from the API graphs with this host's node definitions: nothing drifted."""
    for path, text in render_all(defs).items():
        assert path.read_text() == text, f"{path.name} is stale: run python -m tools.make_workflows"


@pytest.mark.skipif(comfy_host.host_version() != "0.3.75" or comfy_host.fp8_device_mode(),
                    reason="runs once: the tool boots ComfyUI 0.3.75 itself")
def test_make_workflows_command_finds_nothing_stale():
    """The maintainer's command itself (its own host boot and pack link), not only the functions it calls."""
    proc = subprocess.run([sys.executable, "-m", "tools.make_workflows", "--check"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "out of date" not in proc.stdout


def test_official_model_names_by_default():
    names = set()
    for path in API:
        for node in json.loads(path.read_text()).values():
            names |= {v for k, v in node["inputs"].items() if k in ("ckpt_name", "unet_name")}
    assert names <= set(OFFICIAL) and {"sd3.5_large.safetensors", "sd3.5_medium.safetensors"} <= names


@pytest.mark.parametrize("path", UI, ids=lambda p: p.stem)
def test_ui_workflow_nodes_widgets_and_links_exist(defs, path):
    ui = json.loads(path.read_text())
    by_id = {n["id"]: n for n in ui["nodes"]}
    for node in ui["nodes"]:
        assert node["type"] in defs, node["type"]
        assert len(node["widgets_values"]) == widget_count(defs[node["type"]]), (node["type"], node["widgets_values"])
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        out = by_id[src]["outputs"][src_slot]
        assert link_id in out["links"] and by_id[dst]["inputs"][dst_slot]["link"] == link_id
        assert kind == by_id[dst]["inputs"][dst_slot]["type"]
        assert out["type"] == kind or kind == "*", (path.name, out, kind)
    assert ui["last_link_id"] == len(ui["links"]) and ui["last_node_id"] == max(by_id)


def _for_fixtures(graph: dict, fixture_files: dict, lora: str) -> dict:
    """Swap official names for the tiny fixtures and 1024 px for 64 px; everything else as shipped."""
    for node in graph.values():
        inputs = node["inputs"]
        if inputs.get("ckpt_name") in OFFICIAL:
            inputs["ckpt_name"] = fixture_files[f"{OFFICIAL[inputs['ckpt_name']]}_all_in_one"].name
        if "lora_name" in inputs:
            inputs["lora_name"] = lora
        if node["class_type"] == "EmptySD3LatentImage":
            inputs["width"] = inputs["height"] = 64
    return graph


@pytest.mark.parametrize("path", API, ids=lambda p: p.stem)
def test_api_workflow_validates_and_runs_on_fixtures(runner, fixture_files, tiny_lora, comfy_base, path):
    graph = _for_fixtures(json.loads(path.read_text()), fixture_files, tiny_lora)
    outputs = runner.run(graph)
    for node_id, node in graph.items():
        if node["class_type"] == "SaveImage":
            images = outputs[node_id]["images"]
            assert images and (comfy_base / "output" / images[0]["subfolder"] / images[0]["filename"]).exists()
        if node["class_type"] == "SD35FP8SaveModel":
            assert "saved diffusion_models/" in outputs[node_id]["text"][0]
        if node["class_type"] == "SD35FP8CompareImages":
            ssim, psnr, diff, report = runner.node_outputs(node_id)
            assert 0.5 < ssim < 1.0 and psnr > 15 and torch.isfinite(diff).all() and "SSIM" in report
        if node["class_type"] == "SD35FP8HardwareInfo":
            assert runner.node_outputs(node_id)[2] == "weight_only"  # this CI machine is a CPU


def test_samplers_on_a_preset_show_the_preset_values(defs):
    """The shipped graphs show what runs: a sampler on a preset carries that preset's values in its widgets."""
    presets = next(o["sd35_fp8_presets"] for n, _, o in defs["SD35FP8Sampler"]["inputs"] if n == "preset")
    checked = 0
    for path in API:
        for node in json.loads(path.read_text()).values():
            if node["class_type"] == "SD35FP8Sampler" and node["inputs"]["preset"] != "custom":
                values = presets[node["inputs"]["preset"]]
                assert {k: node["inputs"][k] for k in values} == values, path.name
                checked += 1
    assert checked >= 4
