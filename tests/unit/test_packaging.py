"""`pip install .` works and installs the pack as the one package `sd35_fp8` (engine, nodes, the planner's data),
whose CLI then runs from any folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_holds_the_package_and_its_cli_runs_from_anywhere(tmp_path):
    source = tmp_path / "source"  # setuptools writes build/ beside pyproject.toml: build a copy, not the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns("__pycache__", ".*", "build", "*.egg-info"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("comfyui_sd35_fp8-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"sd35_fp8/__init__.py", "sd35_fp8/quant/cli.py", "sd35_fp8/quant/sensitivity.json",
            "sd35_fp8/nodes/loaders.py"} <= names
    assert {n.split("/")[0] for n in names} == {"sd35_fp8", wheel.name.split("-py")[0] + ".dist-info"}, names
    assert not [n for n in names if n.split("/")[1] in ("tests", "bench", "tools", "web", "workflows", "docs")], names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sd35-fp8 = sd35_fp8.quant.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cli = subprocess.run([sys.executable, "-m", "sd35_fp8.quant", "--help"], cwd=elsewhere, capture_output=True,
                         text=True, timeout=300, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "convert" in cli.stdout and "inspect" in cli.stdout
    script = subprocess.run([str(site / "bin" / "sd35-fp8"), "convert", "--help"], cwd=elsewhere,
                            capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})  # the installed console script
    assert script.returncode == 0 and "--preset" in script.stdout, script.stderr[-3000:]
    found = subprocess.run([sys.executable, "-c", "import sd35_fp8.quant.budget as b; print(b.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=300,
                           env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert found.stdout.strip().startswith(str(site)), found.stderr[-2000:]


def _import_entry(prelude: str = "") -> subprocess.CompletedProcess:
    """Import the repo's root __init__.py as ComfyUI does (a package named after the folder's path), in a fresh
    interpreter; print where `sd35_fp8` came from and whether ComfyUI got imported."""
    script = prelude + f"""
import importlib.util, inspect, sys
spec = importlib.util.spec_from_file_location("/custom_nodes/comfyui-sd35-fp8", {str(REPO / "__init__.py")!r},
                                              submodule_search_locations=[{str(REPO)!r}])
entry = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = entry
spec.loader.exec_module(entry)
print(sys.modules["sd35_fp8"].__file__)
print("comfy" in sys.modules, inspect.iscoroutinefunction(entry.comfy_entrypoint), entry.WEB_DIRECTORY)
"""
    return subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=300)


def test_comfyui_entry_registers_the_package_once_and_imports_comfy_only_when_asked():
    done = _import_entry()
    assert done.returncode == 0, done.stderr[-3000:]
    where, flags = done.stdout.splitlines()
    assert where == str(REPO / "__init__.py")
    assert flags == "False True ./web"


def test_comfyui_entry_refuses_a_second_copy_of_the_package(tmp_path):
    other = tmp_path / "sd35_fp8"
    other.mkdir()
    (other / "__init__.py").write_text("")
    done = _import_entry(f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import sd35_fp8\n")
    assert done.returncode != 0
    assert "ImportError: another 'sd35_fp8' is already imported from " + str(other) in done.stderr
    assert f"its own copy from {REPO}." in done.stderr
