"""Run the benchmark: `python -m bench.run [--quick] [--only memory,quantize,...] [--out FILE]`.

Writes the results JSON and prints the section's table after every section (so a failed or interrupted run keeps
what it measured), the goals at the end, and exits non-zero if a section failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback
from pathlib import Path

from .common import RESULTS, boot_host, log, machine, now, setup_torch, versions
from .goals import evaluate
from .table import render

SECTIONS = ("memory", "quantize", "load", "step", "fidelity", "sensitivity", "stock_path", "budget", "t5xxl", "lora",
            "soak")
MODULES = {"quantize": "throughput", "t5xxl": "t5"}
WEIGHTS_NOTE = ("random weights (no real SD3.5 weights can be downloaded here), drawn per tensor: 'gaussian' "
                "N(0, 1/fan_in) and 'student_t' (heavy tails, 1% outlier input channels x8, uneven rows); "
                "headline figures use student_t, both are reported")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes (a smoke test), ~5 minutes on 2 CPU cores")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="results file")
    parser.add_argument("--update", action="store_true",
                        help="keep the other sections already in --out (rerun one section of a full run)")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := set(only) - set(SECTIONS):
        parser.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    setup_torch()
    boot_host()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"mode": "quick" if args.quick else "full", "date": now(), "machine": machine(),
                     **versions(), "weights": WEIGHTS_NOTE, "seconds": {}}
    if args.update and args.out.exists():
        kept = json.loads(args.out.read_text())
        if kept.get("mode") != results["mode"]:
            parser.error(f"--update: {args.out} holds a {kept.get('mode')} run, this is a {results['mode']} one")
        stamp = f"{now()} on {results['machine']['cpu']}"  # the sections rerun here: when, and on what
        results = {**kept, "updated": {**kept.get("updated", {}), **dict.fromkeys(only, stamp)}}
    failed = []
    for name in only:
        t0 = time.perf_counter()
        log(f"section {name}")
        kwargs = {"n_prompts": 10 if args.quick else 50} if name == "soak" else {"quick": args.quick}
        try:
            results[name] = importlib.import_module(f"bench.{MODULES.get(name, name)}").run(**kwargs)
        except Exception as err:  # noqa: BLE001 - keep the other sections' figures
            if name == "soak":  # recorded in the results only: the exit code does not count it
                results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            else:  # the exit code says it failed
                results[name] = {"error": traceback.format_exc()}
                failed.append(name)
                log(f"section {name} FAILED:\n{results[name]['error']}")
        results["seconds"][name] = round(time.perf_counter() - t0, 1)
        results["seconds"]["total"] = round(sum(v for k, v in results["seconds"].items() if k != "total"), 1)
        results["goals"] = evaluate(results)
        args.out.write_text(json.dumps(results, indent=1, default=str))
        print(render(results, only=[name]), flush=True)
    print(render(results), flush=True)
    log(f"wrote {args.out}; this run's sections took {sum(results['seconds'][name] for name in only):.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
