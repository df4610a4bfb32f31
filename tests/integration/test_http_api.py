"""The real ComfyUI HTTP server with the pack: path tricks in model names, and many clients at once (issue 7).

Model names reach our loaders only through ComfyUI's combo validation (a name must be one of the listed
files) and `folder_paths.get_full_path`, which keeps the name inside the model folders. The tests place a
valid safetensors file outside the model folders and watch it with inotify: names with `..` or an absolute
path are rejected and that file is never opened, by the server or by our loaders called directly.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import shutil
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import combo_options
from PIL import Image
from prompts import dm_loader, encode, fp8_loader, our_sampler, quantize_model, show

from tools import comfy_host

REPO = Path(__file__).resolve().parents[2]
IN_ACCESS, IN_OPEN = 0x1, 0x20


class Inotify:
    """Kernel-level record of every open/read of the files in some folders (any process)."""

    def __init__(self, *folders: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.folders = {}
        for folder in folders:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_OPEN | IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder} failed")
            self.folders[wd] = Path(folder)

    def events(self) -> list[str]:
        """Paths opened or read since the last call (a folder itself shows as the folder's path)."""
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            offset = 0
            while offset < len(data):
                wd, _mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16: offset + 16 + length].rstrip(b"\0").decode()
                out.append(str(self.folders[wd] / name) if name else str(self.folders[wd]))
                offset += 16 + length

    def close(self) -> None:
        os.close(self.fd)


def _bait(folder: Path, fixture_files) -> Path:
    """A real, loadable SD3.5 transformer outside every model folder (plus a diffusers-shaped folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fixture_files["large_transformer"], folder / "bait.safetensors")
    shutil.copytree(fixture_files["medium_diffusers"], folder / "bait_diffusers", dirs_exist_ok=True)
    return folder / "bait.safetensors"


# --------------------------------------------------------------------------- HTTP helpers

def http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def submit(url: str, prompt: dict, client_id: str = "tests") -> tuple[int, dict]:
    return http(url + "/prompt", {"prompt": prompt, "client_id": client_id})


def wait_done(url: str, prompt_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, history = http(f"{url}/history/{prompt_id}")
        entry = history.get(prompt_id)
        if status == 200 and entry and entry.get("status", {}).get("completed") is not None:
            if entry["status"]["status_str"] in ("success", "error"):
                return entry
        time.sleep(0.2)
    raise TimeoutError(f"prompt {prompt_id} not done within {timeout}s")


def execution_error(entry: dict) -> str:
    return " ".join(str(data.get("exception_message", "")) for event, data in entry["status"]["messages"]
                    if event == "execution_error")


def assert_healthy(server: comfy_host.ServerProcess) -> None:
    assert server.proc.poll() is None, "the server process died"
    status, stats = http(server.url + "/system_stats")
    assert status == 200 and stats["system"]["comfyui_version"] == comfy_host.host_version()
    status, queue = http(server.url + "/queue")
    assert status == 200 and queue == {"queue_running": [], "queue_pending": []}, queue


# --------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def site(tmp_path_factory, comfy_dir, fixture_files):
    """A ComfyUI base folder with the fixtures, bait files beside and outside it, and the server running."""
    root = tmp_path_factory.mktemp("http")
    base = comfy_host.make_base_dir(root / "base", REPO)
    comfy_host.link_model(base, "checkpoints", fixture_files["large_all_in_one"])
    comfy_host.link_model(base, "diffusion_models", fixture_files["large_transformer"])
    near = _bait(base / "secret", fixture_files)  # beside models/: reachable as ../../secret/...
    far = _bait(root / "elsewhere", fixture_files)  # anywhere else: reachable by absolute path
    server = comfy_host.ServerProcess(comfy_dir, base, root / "server.log").start()
    try:
        yield {"server": server, "url": server.url, "base": base, "near": near, "far": far}
    finally:
        server.stop()


def _traversal_names(site: dict) -> list[str]:
    near, far = site["near"], site["far"]
    return ["../../secret/bait.safetensors", "../../../base/secret/bait.safetensors", str(near), str(far),
            "tiny_sd35_large.safetensors/../../../secret/bait.safetensors", "..\\..\\secret\\bait.safetensors",
            "../../secret/bait_diffusers", str(far.parent / "bait_diffusers")]


@pytest.mark.parametrize("node", ["SD35FP8CheckpointLoader", "SD35FP8DiffusionModelLoader"])
def test_dotdot_and_absolute_names_are_rejected_and_nothing_outside_is_opened(site, node):
    watch = Inotify(site["near"].parent, site["far"].parent, site["far"].parent / "bait_diffusers" / "transformer")
    try:
        with open(site["far"], "rb") as f:  # the watch works: our own read of the bait shows up
            f.read(1)
        assert str(site["far"]) in watch.events()
        for name in _traversal_names(site):
            if node == "SD35FP8CheckpointLoader":
                prompt, input_name = {"ld": fp8_loader(name), "out": show(["ld", 3])}, "ckpt_name"
            else:
                prompt, input_name = {"ld": dm_loader(name), "out": show(["ld", 1])}, "model_name"
            status, body = submit(site["url"], prompt)
            assert status == 400, (name, body)
            errors = body["node_errors"]["ld"]["errors"]
            assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [("value_not_in_list", input_name)]
            assert name in errors[0]["details"]
        time.sleep(0.5)
        assert watch.events() == [], "a file outside the model folders was opened"
    finally:
        watch.close()
    status, info = http(site["url"] + f"/object_info/{node}")
    listed = combo_options(info[node]["input"]["required"]["ckpt_name" if "Checkpoint" in node else "model_name"])
    assert listed and not [n for n in listed if ".." in n or n.startswith("/") or "secret" in n or "bait" in n]
    assert_healthy(site["server"])


def test_loaders_called_directly_resolve_names_only_inside_model_folders(comfy_nodes, comfy_base, fixture_files,
                                                                         tmp_path):
    """Defence in depth, in-process: even without the validator, our loaders never open the bait."""
    near = _bait(comfy_base / "secret", fixture_files)
    far = _bait(tmp_path / "elsewhere", fixture_files)
    watch = Inotify(near.parent, far.parent, near.parent / "bait_diffusers" / "transformer",
                    far.parent / "bait_diffusers" / "transformer")
    quant = {"fp8_format": "float8_e4m3fn", "scaling": "per_channel", "protect_preset": "auto", "compute": "auto"}
    try:
        for name in ["../../secret/bait.safetensors", str(near), str(far), "../../secret/bait_diffusers",
                     str(far.parent / "bait_diffusers")]:
            with pytest.raises(FileNotFoundError, match="ckpt_name: .* is not in models/checkpoints"):
                comfy_nodes["SD35FP8CheckpointLoader"].execute(ckpt_name=name, text_encoder_fp8="none", **quant)
            with pytest.raises(FileNotFoundError, match="model_name: .* is not a diffusers folder"):
                comfy_nodes["SD35FP8DiffusionModelLoader"].execute(model_name=name, **quant)
        assert watch.events() == [], "a file outside the model folders was opened"
    finally:
        watch.close()


@pytest.mark.parametrize("prefix", ["../escaped", "../secret/escaped", "diffusion_models/../../escaped", "ABSOLUTE"])
def test_save_prefix_cannot_leave_the_output_folder(site, prefix):
    base = site["base"]
    if prefix == "ABSOLUTE":
        prefix = str(site["far"].parent / "escaped")
    before = {p for p in base.parent.rglob("*")}
    prompt = {"ld": dm_loader("tiny_sd35_large_transformer.safetensors"),
              "save": {"class_type": "SD35FP8SaveModel", "inputs": {"model": ["ld", 0], "filename_prefix": prefix}}}
    status, body = submit(site["url"], prompt)
    assert status == 200, body
    entry = wait_done(site["url"], body["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    text = execution_error(entry)
    assert f"filename_prefix: {prefix!r} is not a file name inside the output folder" in text, text
    assert "no '..', not absolute" in text
    created = {p for p in base.parent.rglob("*")} - before
    assert not [p for p in created if "escaped" in p.name or p.suffix in (".safetensors", ".part")], created
    assert_healthy(site["server"])


# --------------------------------------------------------------------------- many clients at once

CLIENTS = 4
PROMPTS_EACH = 2
SEEDS = (101, 202)


def _client_prompt(client: int, index: int) -> dict:
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd35_large.safetensors"}},
              **encode("ck")}
    # the comment line changes nothing in the result but makes every prompt quantize and sample anew
    prompt["q"] = quantize_model(["ck", 0], protect_patterns=f"# client {client} prompt {index}")
    prompt["s"] = our_sampler(["q", 0], seed=SEEDS[client % 2], steps=2)
    prompt["dec"] = {"class_type": "VAEDecode", "inputs": {"samples": ["s", 0], "vae": ["ck", 2]}}
    prompt["save"] = {"class_type": "SaveImage", "inputs": {"images": ["dec", 0],
                                                           "filename_prefix": f"concurrency/c{client}_p{index}"}}
    return prompt


def test_concurrent_clients_all_get_their_own_right_outputs(site):
    url = site["url"]
    barrier = threading.Barrier(CLIENTS + 2)
    submitted: dict[tuple, tuple[int, dict]] = {}

    def client(number: int) -> None:
        barrier.wait()
        for index in range(PROMPTS_EACH):
            submitted[(number, index)] = submit(url, _client_prompt(number, index), client_id=f"client-{number}")

    def troublemaker() -> None:
        barrier.wait()
        bad = _client_prompt(9, 0)
        bad["q"]["inputs"]["protect_patterns"] = "re:("  # valid JSON, fails when it runs
        submitted[("bad", "runtime")] = submit(url, bad, client_id="bad")
        bad = _client_prompt(9, 1)
        bad["s"]["inputs"]["steps"] = 0  # rejected by validation
        submitted[("bad", "invalid")] = submit(url, bad, client_id="bad")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    threads.append(threading.Thread(target=troublemaker))
    start = time.monotonic()
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join(timeout=120)
    assert len(submitted) == CLIENTS * PROMPTS_EACH + 2
    status, body = submitted.pop(("bad", "invalid"))
    assert status == 400 and body["node_errors"]["s"]["errors"][0]["extra_info"]["input_name"] == "steps"
    status, body = submitted.pop(("bad", "runtime"))
    assert status == 200
    bad_entry = wait_done(url, body["prompt_id"])
    assert bad_entry["status"]["status_str"] == "error"
    assert "protect_patterns line 1: 're:(' is not a valid regex" in execution_error(bad_entry)

    images: dict[tuple, np.ndarray] = {}
    for (number, index), (status, body) in submitted.items():
        assert status == 200 and body["node_errors"] == {}, body
        entry = wait_done(url, body["prompt_id"])
        assert entry["status"]["status_str"] == "success", execution_error(entry)
        saved = entry["outputs"]["save"]["images"]
        assert len(saved) == 1 and saved[0]["filename"].startswith(f"c{number}_p{index}_"), saved
        query = urllib.parse.urlencode({"filename": saved[0]["filename"], "subfolder": saved[0]["subfolder"],
                                        "type": "output"})
        with urllib.request.urlopen(f"{url}/view?{query}", timeout=60) as r:  # as a web client fetches it
            images[(number, index)] = np.asarray(Image.open(io.BytesIO(r.read())))
    elapsed = time.monotonic() - start
    assert elapsed < 180, f"{CLIENTS * PROMPTS_EACH} prompts took {elapsed:.0f}s"

    by_seed = {seed: [img for (n, _), img in images.items() if SEEDS[n % 2] == seed] for seed in SEEDS}
    for seed, group in by_seed.items():
        assert len(group) == CLIENTS * PROMPTS_EACH // 2
        assert all(np.array_equal(group[0], other) for other in group[1:]), f"seed {seed}: outputs differ"
    assert np.abs(by_seed[SEEDS[0]][0].astype(int) - by_seed[SEEDS[1]][0].astype(int)).mean() > 5
    assert_healthy(site["server"])
    # and the next prompt still runs
    status, body = submit(url, _client_prompt(0, 99))
    assert status == 200 and wait_done(url, body["prompt_id"])["status"]["status_str"] == "success"
    assert_healthy(site["server"])

