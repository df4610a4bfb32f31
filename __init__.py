"""ComfyUI entry point of the SD3.5 FP8 node pack (V3: `comfy_entrypoint`).

ComfyUI imports this folder as a package under a name of its own (the folder's path). The pack's code lives in
the package `sd35_fp8` beside this file (`sd35_fp8.quant`: the FP8 engine, no ComfyUI; `sd35_fp8.nodes`: the
nodes), and is imported under that one name everywhere: here, in the tests, the benchmark, the CLI and a
`pip install`. This file registers it (without putting this folder on sys.path, which would expose bench/,
tools/, tests/ as top-level modules) and imports the nodes, hence ComfyUI, only when ComfyUI asks for them.
`web/` holds the frontend extension (the sampler's presets fill its widgets) and the nodes' help pages.
"""

import importlib.util
import sys
from pathlib import Path

_PACKAGE = "sd35_fp8"
_PACKAGE_DIR = Path(__file__).resolve().parent / _PACKAGE


def _register_package() -> None:
    loaded = sys.modules.get(_PACKAGE)
    if loaded is None:
        spec = importlib.util.spec_from_file_location(_PACKAGE, _PACKAGE_DIR / "__init__.py",
                                                      submodule_search_locations=[str(_PACKAGE_DIR)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[_PACKAGE] = module
        spec.loader.exec_module(module)
    elif Path(loaded.__file__).resolve().parent != _PACKAGE_DIR:
        raise ImportError(f"another '{_PACKAGE}' is already imported from {Path(loaded.__file__).parent} (a pip "
                          f"install, or a second copy of this pack in custom_nodes): remove it, this pack runs "
                          f"its own copy from {_PACKAGE_DIR}. (A custom_nodes folder named '{_PACKAGE}' also "
                          f"clashes: rename it, e.g. to comfyui-sd35-fp8.)")


_register_package()


async def comfy_entrypoint():
    from sd35_fp8.nodes import comfy_entrypoint as entrypoint

    return await entrypoint()


WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
