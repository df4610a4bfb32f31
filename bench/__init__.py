"""Benchmarks of the FP8 engine against ComfyUI's fp8 cast and optimum-quanto (`make bench`, `make bench-quick`).

Run as `python -m bench.run [--quick]` from the repository root; see bench/README.md.
"""

import tools  # noqa: F401  (sets up the checkout's imports: sd35_fp8 registered, the root off sys.path)
