"""The SD3.5 FP8 node pack: ComfyUI's entry point (V3: `comfy_entrypoint`) and the package `sd35_fp8`.

This folder is one Python package, `sd35_fp8`: `sd35_fp8.quant` is `quant/` (the FP8 engine, pure PyTorch, never
imports comfy; also the CLI `python -m sd35_fp8.quant`) and `sd35_fp8.nodes` is `nodes/` (the nodes, which import
ComfyUI). That one name serves everywhere: ComfyUI, the tests, the benchmark, the CLI and a `pip install .`.

ComfyUI imports this file under a name of its own (the folder's path). It then registers this folder as
`sd35_fp8`, without putting the folder on sys.path: there `import nodes` would find the pack's nodes/ instead of
ComfyUI's own `nodes` module, and `import quant` a second copy of the engine. The nodes, hence ComfyUI, are
imported only when ComfyUI asks for them. Imported as `sd35_fp8` itself (a pip install, or the development tools
registering the checkout), this file does nothing more. `web/` holds the frontend extension and the help pages.
"""

import importlib.util
import sys
from pathlib import Path

_PACKAGE = "sd35_fp8"
_PACKAGE_DIR = Path(__file__).resolve().parent


def _register_package() -> None:
    """Make this folder the package `sd35_fp8`, or refuse when another copy of it is already imported."""
    loaded = sys.modules.get(_PACKAGE)
    if loaded is None:
        spec = importlib.util.spec_from_file_location(_PACKAGE, _PACKAGE_DIR / "__init__.py",
                                                      submodule_search_locations=[str(_PACKAGE_DIR)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[_PACKAGE] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[_PACKAGE]
            raise
    elif Path(loaded.__file__).resolve().parent != _PACKAGE_DIR:
        raise ImportError(f"another '{_PACKAGE}' is already imported from {Path(loaded.__file__).parent} (a pip "
                          f"install, or a second copy of this pack in custom_nodes): remove it, this pack runs "
                          f"its own copy from {_PACKAGE_DIR}.")


if __name__ != _PACKAGE:
    _register_package()


async def comfy_entrypoint():
    from sd35_fp8.nodes import comfy_entrypoint as entrypoint

    return await entrypoint()


WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
