"""Shared fixtures: the pinned ComfyUI host, its base folder, the tiny SD3.5 checkpoints.

The host is booted once per test session (ComfyUI keeps its settings in module
globals): COMFY_HOST picks the version (0.3.75 or 0.8.0), COMFY_FP8_DEVICE=1 boots it
with --supports-fp8-compute (`make test` runs each). Each session gets a fresh temporary
base folder for models, input and output, with this repo linked into custom_nodes/.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tools
from tools import comfy_host, tiny_sd35

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
PACK_NAME = "comfyui-sd35-fp8"  # the folder `git clone` makes

HOST = comfy_host.host_version()
comfy_host.activate_overlay(CACHE, HOST)  # before anything imports the host's packages


def pytest_report_header(config) -> str:
    return f"host: {comfy_host.host_label()}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failure names the host it failed on (make test runs the suite on each)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("host", comfy_host.host_label()))
        report.nodeid = f"{report.nodeid} [{comfy_host.host_label()}]"


@pytest.fixture(scope="session", autouse=True)
def root_off_sys_path() -> None:
    """pytest treats the repository root as a package (it has an __init__.py: ComfyUI's entry) and, setting that
    package up before the first test, imports its __init__.py and puts its folder on sys.path (or, where the folder's
    name is an identifier, the folder above): take the root off again, as `tools` did at import."""
    tools.keep_root_off_sys_path()


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    return comfy_host.materialise(CACHE, HOST)


@pytest.fixture(scope="session")
def fixture_files() -> dict:
    """Build (or reuse) the tiny checkpoints; returns {name: path} plus the manifest. They are data: one host
    (the first) builds them for every host's run."""
    out = CACHE / "fixtures"
    manifest = tiny_sd35.build_in_subprocess(comfy_host.materialise(CACHE, comfy_host.HOSTS[0]), out)
    files = {"dir": out, "manifest": manifest}
    for variant, entry in manifest["files"].items():
        for kind in ("all_in_one", "transformer", "diffusers", "text_encoder"):
            if kind in entry:
                files[f"{variant}_{kind}"] = out / entry[kind]
    return files


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory, fixture_files: dict) -> Path:
    base = comfy_host.make_base_dir(tmp_path_factory.mktemp("comfy_base"), REPO, PACK_NAME)
    for key, path in fixture_files.items():
        if key.endswith("_all_in_one"):
            comfy_host.link_model(base, "checkpoints", path)
        elif key.endswith("_transformer") or key.endswith("_diffusers"):
            comfy_host.link_model(base, "diffusion_models", path)
        elif key.endswith("_text_encoder"):
            comfy_host.link_model(base, "text_encoders", path)
    return base


@pytest.fixture(scope="session")
def comfy_nodes(comfy_dir: Path, comfy_base: Path) -> dict:
    """Boot ComfyUI in this process and load all nodes; fails if our pack fails to import.

    At the session's end: the pack's code was imported once, as `sd35_fp8` from this checkout (tests and ComfyUI
    share its modules, so isinstance checks and module state are the ones ComfyUI runs). ComfyUI builds T5-XXL with the
    fixture's smaller config (tiny_sd35.use_tiny_t5xxl)."""
    comfy_host.boot(comfy_dir, comfy_base)
    tiny_sd35.use_tiny_t5xxl()
    yield comfy_host.load_nodes(REPO)
    assert Path(sys.modules["sd35_fp8"].__file__).resolve() == REPO / "__init__.py"
    assert Path(sys.modules["nodes"].__file__).resolve() == comfy_dir.resolve() / "nodes.py"  # ComfyUI's, not ours
    assert not [p for p in sys.path if Path(p or ".").resolve() == REPO], "the repository root is on sys.path"
    second = sorted(name for name in sys.modules if f".{name}".endswith((".quant.formats", ".nodes.fp8_ops"))
                    and not name.startswith("sd35_fp8."))
    assert not second, f"the pack's code was imported a second time, under another name: {second}"


@pytest.fixture(scope="session")
def runner(comfy_nodes) -> comfy_host.PromptRunner:
    return comfy_host.PromptRunner()


@pytest.fixture(scope="session")
def pack(comfy_nodes):
    """Our pack's module as ComfyUI imported it (use its classes for isinstance checks): the module ComfyUI made of
    this checkout's __init__.py, whatever name it gave it."""
    return next(module for name, module in list(sys.modules.items()) if os.sep in name  # ComfyUI names it by path
                and getattr(module, "__file__", None) and Path(module.__file__).resolve() == REPO / "__init__.py")


# The fixture LoRAs' factors are drawn with this standard deviation: strong LoRAs, which move one denoiser call of
# the tiny Large fixture by ~40% at strength 1 (tests/integration/test_lora_fp8.py checks >= 30%), so that FP8's own
# error (~2%) cannot hide what a route does to the LoRA.
LORA_FACTOR_STD = 0.5


@pytest.fixture(scope="session")
def write_lora(comfy_base):
    """write_lora(name, seed, {key: (out_features, in_features)}): a strong rank-4 LoRA (LORA_FACTOR_STD) on those
    keys, saved under models/loras; returns its name."""

    def write(name: str, seed: int, shapes: dict[str, tuple[int, int]]) -> str:
        gen = torch.Generator().manual_seed(seed)
        rank = 4
        tensors = {}
        for key, (out_f, in_f) in shapes.items():
            tensors[f"{key}.lora_down.weight"] = (torch.randn(rank, in_f, generator=gen) * LORA_FACTOR_STD).half()
            tensors[f"{key}.lora_up.weight"] = (torch.randn(out_f, rank, generator=gen) * LORA_FACTOR_STD).half()
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        path = comfy_base / "models" / "loras" / name
        save_file(tensors, str(path))
        return path.name

    return write


def _large_shapes(fixture_files: dict, layers: dict[str, str]) -> dict[str, tuple[int, int]]:
    """{key: "attn" | "mlp"} as the tiny Large fixture's shapes: an attn key is hidden x hidden, an mlp key
    4 hidden x hidden."""
    hidden = 64 * fixture_files["manifest"]["files"]["large"]["mmdit"]["depth"]
    return {key: (4 * hidden if kind == "mlp" else hidden, hidden) for key, kind in layers.items()}


@pytest.fixture(scope="session")
def tiny_lora(write_lora, fixture_files) -> str:
    """A LoRA for the tiny Large fixture: diffusers keys on the fused qkv (sliced patches) and a native key.

    A strong LoRA (LORA_FACTOR_STD): it widens most patched rows' range, so a merge re-quantizing with the old
    scale would clip it (a merge takes a fresh scale, nodes/fp8_ops.py; the FP8 layers apply it at run time)."""
    layers = {f"transformer.transformer_blocks.0.attn.{proj}": "attn"
              for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
    for block in (0, 1):
        layers[f"diffusion_model.joint_blocks.{block}.x_block.mlp.fc1"] = "mlp"
        layers[f"diffusion_model.joint_blocks.{block}.x_block.attn.proj"] = "attn"
    return write_lora("tiny_sd35_large_lora.safetensors", 123, _large_shapes(fixture_files, layers))


@pytest.fixture(scope="session")
def second_lora(write_lora, fixture_files) -> str:
    """Another LoRA, to stack on `tiny_lora`: it shares block 0's fc1 and attention output with it."""
    layers = {f"diffusion_model.joint_blocks.{block}.x_block.attn.proj": "attn" for block in (0, 1)}
    layers["diffusion_model.joint_blocks.0.context_block.attn.proj"] = "attn"
    layers["diffusion_model.joint_blocks.0.x_block.mlp.fc1"] = "mlp"
    return write_lora("tiny_sd35_large_lora_b.safetensors", 321, _large_shapes(fixture_files, layers))
