"""Development tools: the ComfyUI test hosts, the tiny SD3.5 fixtures, workflows, the demo. Run as modules
(`python -m tools.demo`); nothing here ships to users.

Importing this package sets up the imports of a checkout for every development entry point (`python -m tools.…`,
`python -m bench.…` through bench/__init__.py, the tests through tests/conftest.py): the repository root becomes
the package `sd35_fp8` (as ComfyUI's entry makes it), `tools` and `bench` stay importable as top-level
packages, and then the root leaves sys.path (where `python -m` and pytest's `pythonpath` put it): there
`import nodes` would find the pack's nodes/ instead of ComfyUI's `nodes` module, and `import quant` a second
copy of the engine. Nothing here depends on the checkout's folder name.
"""

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _register(name: str, folder: Path) -> None:
    """Import `folder` as the package `name` (by its path, not through sys.path), once."""
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _is_repo(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == REPO
    except OSError:
        return False


def engine_cli(*args: str) -> list[str]:
    """The command that runs the engine's CLI (`sd35-fp8`, or `python -m sd35_fp8.quant` once installed) from this
    checkout in this interpreter: `python -m sd35_fp8.quant` finds no `sd35_fp8` in a checkout not installed."""
    return [sys.executable, "-c", "import tools; from sd35_fp8.quant.cli import main; raise SystemExit(main())", *args]


def keep_root_off_sys_path() -> None:
    """Take every entry naming the repository root off sys.path (`python -m` and pytest put it there)."""
    sys.path[:] = [entry for entry in sys.path if not _is_repo(entry)]


def _set_up_checkout_imports() -> None:
    _register("sd35_fp8", REPO)  # the root __init__.py refuses a second copy imported from elsewhere
    loaded = Path(sys.modules["sd35_fp8"].__file__).resolve().parent
    if loaded != REPO:
        raise ImportError(f"another 'sd35_fp8' is already imported from {loaded}; the development tools run the "
                          f"checkout's own copy from {REPO}: uninstall the other (pip uninstall comfyui-sd35-fp8)")
    _register("bench", REPO / "bench")
    keep_root_off_sys_path()


_set_up_checkout_imports()
