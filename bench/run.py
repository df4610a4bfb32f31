"""Run the benchmark: `python -m bench.run [--quick] [--only memory,quantize,...] [--out FILE]`.

Writes the results JSON after every section (so a failed or interrupted run keeps what it measured),
prints the tables at the end and exits non-zero if a section failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback
from pathlib import Path

from .common import RESULTS, boot_host, log, machine, now, setup_torch, versions

SECTIONS = ("memory", "quantize", "load", "step", "fidelity", "sensitivity", "stock_path", "soak")
MODULES = {"quantize": "throughput"}
SOAK_PROMPTS = {True: 10, False: 50}
WEIGHTS_NOTE = ("random weights (no real SD3.5 weights can be downloaded here), drawn per tensor: 'gaussian' "
                "N(0, 1/fan_in) and 'student_t' (heavy tails, 1% outlier input channels x8, uneven rows); "
                "headline figures use student_t, both are reported")


def _soak(quick: bool) -> dict:
    """bench/soak.py's run(n_prompts) -> dict; its failure is recorded in the results, not raised."""
    try:
        return dict(importlib.import_module("bench.soak").run(n_prompts=SOAK_PROMPTS[quick]))
    except Exception as err:  # noqa: BLE001 - recorded in the results, the rest of the run goes on
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes, under 5 minutes on 2 CPU cores")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--out", default=str(RESULTS / "latest.json"), help="results file")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    setup_torch()
    boot_host()
    from .goals import evaluate
    from .table import render

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"mode": "quick" if args.quick else "full", "date": now(), "machine": machine(),
                     **versions(), "weights": WEIGHTS_NOTE, "seconds": {}}
    failed = []
    start = time.perf_counter()
    for name in only:
        t0 = time.perf_counter()
        log(f"section {name}")
        if name == "soak":
            results[name] = _soak(args.quick)
        else:
            try:
                module = importlib.import_module(f"bench.{MODULES.get(name, name)}")
                results[name] = module.run(quick=args.quick)
            except Exception:  # noqa: BLE001 - keep the other sections' figures; the exit code says it failed
                results[name] = {"error": traceback.format_exc()}
                failed.append(name)
                log(f"section {name} FAILED:\n{results[name]['error']}")
        results["seconds"][name] = round(time.perf_counter() - t0, 1)
        results["seconds"]["total"] = round(time.perf_counter() - start, 1)
        results["goals"] = evaluate(results)
        out.write_text(json.dumps(results, indent=1, default=str))
    print(render(results), flush=True)
    log(f"wrote {out} in {results['seconds']['total']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
