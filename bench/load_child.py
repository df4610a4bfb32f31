"""One measured load, alone in its own process so its peak RSS is its own: `python -m bench.load_child MODE FILE [OUT]`.

Prints one JSON line: seconds (the load alone), rss_before (after imports, before the load), peak_rss
(VmHWM: the peak resident set of this process image, counting the file pages it maps; ru_maxrss would
carry over the parent's peak across fork+exec), peak_anon (sampled anonymous memory, i.e. without mapped
file pages) and the bytes the result holds.
Modes:
  imports       import torch, safetensors, quant (the baseline of the plain-read modes)
  comfy_imports boot the ComfyUI host and import its loaders and our ops (the baseline of the model builds)
  ours_stream   quant.streaming.quantize_safetensors_stream (default preset), nothing else
  ours_model    the same, then ComfyUI's load_diffusion_model_state_dict with our FP8 ops (the loader node's path)
  comfy_fp16    ComfyUI's own comfy.sd.load_diffusion_model of the FP16 file
  save_fp8      stream-quantize FILE and save it to OUT with quant.checkpoint.save_quantized (not measured)
  read          safetensors.torch.load_file(FILE), each tensor then copied (load_file maps the file lazily)
Model builds ask ComfyUI for float16 weights (model_options dtype), as on a GPU: with --cpu it would
otherwise upcast every 16-bit weight to float32.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from bench.common import process_status

MODES = ("imports", "comfy_imports", "ours_stream", "ours_model", "comfy_fp16", "save_fp8", "read")


class AnonPeak:
    """Samples RssAnon every 20 ms in a thread (ru_maxrss also counts mapped file pages)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, process_status("RssAnon"))
            time.sleep(0.02)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, process_status("RssAnon"))


def main(argv: list[str]) -> dict:
    mode, path = argv[0], argv[1] if len(argv) > 1 else ""
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {MODES}")
    import torch
    from safetensors.torch import load_file

    from sd35_fp8.quant.checkpoint import save_quantized
    from sd35_fp8.quant.config import QuantConfig
    from sd35_fp8.quant.report import nbytes
    from sd35_fp8.quant.streaming import quantize_safetensors_stream

    torch.set_num_threads(2)
    if mode in ("comfy_imports", "ours_model", "comfy_fp16"):
        from bench.common import boot_host

        boot_host()
        import comfy.sd

        from sd35_fp8.nodes import fp8_ops, fp8_tables

        ops = fp8_ops.make_fp8_ops("weight_only")
    result: dict = {"mode": mode}
    rss_before = process_status("VmRSS")
    anon_before = process_status("RssAnon")
    start = time.perf_counter()
    with AnonPeak() as anon:
        if mode in ("ours_stream", "ours_model", "save_fp8"):
            sd, formats, _ = quantize_safetensors_stream(path, QuantConfig())
        if mode == "ours_stream":
            result["bytes"] = nbytes(*sd.values())
        elif mode == "ours_model":
            with fp8_tables.fp8_tables_in_place(sd, ""):  # as the loader node does: pos_embed stays FP8
                model = comfy.sd.load_diffusion_model_state_dict(
                    sd, model_options={"custom_operations": ops, "dtype": torch.float16})
            del sd
            result["bytes"] = nbytes(*model.model.diffusion_model.state_dict().values())
        elif mode == "comfy_fp16":
            model = comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float16})
            result["bytes"] = nbytes(*model.model.diffusion_model.state_dict().values())
        elif mode == "save_fp8":
            save_quantized(argv[2], sd, formats, overwrite=True)
        elif mode == "read":
            sd = load_file(path)
            sd = {k: sd[k].clone() for k in list(sd)}
            result["bytes"] = nbytes(*sd.values())
    return result | {"seconds": time.perf_counter() - start, "rss_before": rss_before, "anon_before": anon_before,
                     "peak_rss": process_status("VmHWM"), "peak_anon": anon.peak}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
