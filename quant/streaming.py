"""Quantize while reading: tensor by tensor from a safetensors file.

The 16-bit model is never held whole: each tensor is mapped on its own (a map of the whole file
would count in the process's resident memory for as long as it lives), quantized if the policy
says so, and only the FP8 result is kept, so peak host memory stays near the FP8 model's size.
`quantize_state_dict` runs the same per-tensor step over an in-memory dict (popping as it
goes), so both give bit-identical results.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .checkpoint import (
    FREE_MEMORY,
    QUANT_METADATA_KEY,
    SAFETENSORS_DTYPES,
    check_safetensors,
    header_shapes_dtypes,
    reading,
)
from .config import QuantConfig
from .decision import ALREADY_FP8, UNIT_SCALE
from .engine import Stored, run_plan
from .formats import FP8_DTYPES, format_name
from .plan import (
    CHECKPOINT_TEXT_ENCODER_PREFIX,
    LOADER_TEXT_ENCODER_CHOICES,
    QUANT_ENTRY_SUFFIX,
    WEIGHT_SCALE_SUFFIXES,
    UnsupportedQuantFormat,
    choose_encoders,
    make_plan,
)
from .report import Report

Progress = Callable[[int, int], None]


def _refuse_unknown_formats(metadata: Mapping[str, str], quant_entries: Mapping[str, bytes]) -> None:
    """Refuse, naming the layer, any layer a file declares in a format other than scaled FP8: packed formats are
    never read as floats (that would re-quantize their bytes). Declared by its `_quantization_metadata` header
    (values are dicts, or bare strings as ComfyUI's QUANTIZATION.md shows them) and ComfyUI 0.8.0's per-layer
    `<layer>.comfy_quant` tensors."""
    declared: dict[str, str] = {}
    raw = metadata.get(QUANT_METADATA_KEY)
    if raw is not None:
        try:
            layers = json.loads(raw).get("layers", {})
        except (ValueError, AttributeError):
            raise ValueError(f"the {QUANT_METADATA_KEY} header is not JSON with a 'layers' table") from None
        declared.update({name: str(v.get("format") if isinstance(v, dict) else v) for name, v in layers.items()})
    for layer, blob in quant_entries.items():
        try:
            declared[layer] = str(json.loads(blob).get("format"))
        except (ValueError, AttributeError):
            raise ValueError(f"{layer}.comfy_quant is not a JSON quantization entry") from None
    for layer, fmt in sorted(declared.items()):
        if fmt not in FP8_DTYPES:
            raise UnsupportedQuantFormat(
                f"{layer} is stored as {fmt!r}, a quantized format this pack does not read (it reads float8_e4m3fn "
                "and float8_e5m2 layers). Load this file with ComfyUI's own loader, or quantize a 16-bit file")


@dataclass(frozen=True)
class _Source:
    """Where `_quantize_all` reads: `take` yields each tensor once (read or popped), `peek` fetches a tensor by key,
    again if need be (scales, quantization entries, the layers a memory budget redoes), `keep` makes an output
    tensor safe to hold (a tensor over the file's mapped pages is copied out)."""

    keys: list[str]
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, torch.dtype]
    take: Callable[[str], torch.Tensor]
    peek: Callable[[str], torch.Tensor]
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


def _quantize_all(src: _Source, config: QuantConfig, model_prefix: str, text_encoders: str | None,
                  progress: Progress | None, hint: str, budget_itemsize: int | None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str], Report]:
    """Both entry points: plan the source's tensors, run the plan, lay out the results as a state dict."""
    keys, peek = src.keys, src.peek
    entries = {k[: -len(QUANT_ENTRY_SUFFIX)]: peek(k).numpy().tobytes() for k in keys if k.endswith(QUANT_ENTRY_SUFFIX)}
    _refuse_unknown_formats(src.metadata, entries)
    chosen = choose_encoders("text_encoder_fp8", text_encoders or "none", LOADER_TEXT_ENCODER_CHOICES)
    plan = make_plan(config, src.shapes, src.dtypes, model_prefix=model_prefix, hint=hint,
                     text_encoders={e: f"{CHECKPOINT_TEXT_ENCODER_PREFIX}{e}." for e in chosen})
    scales = {}
    for key in plan.keys(ALREADY_FP8):
        base = key.removesuffix(".weight")
        scale_key = next((base + s for s in WEIGHT_SCALE_SUFFIXES if base + s in src.shapes), None)
        if scale_key is not None:
            scales[key] = peek(scale_key)
    # Tables first (pos_embed: 9% of Medium): their 16-bit copy is then briefly held beside the FP8 one while
    # little else is, instead of on top of the whole FP8 model at the end.
    order = sorted(keys, key=lambda k: plan[k].action != UNIT_SCALE)
    results, report = run_plan(plan, order, src.take, source=peek, scales=scales, own=src.keep, progress=progress,
                               itemsize=budget_itemsize)
    out, layer_formats = _state_dict(results)
    return out, layer_formats, report


def _state_dict(results: Mapping[str, Stored]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict: each tensor, an FP8 layer's scale as `<layer>.weight_scale`; {model layer: FP8 format})."""
    out: dict[str, torch.Tensor] = {}
    layer_formats: dict[str, str] = {}
    for key, result in results.items():
        out[key] = result.tensor
        if result.scale is not None:
            out[key.removesuffix(".weight") + ".weight_scale"] = result.scale
            if result.decision.in_model:
                layer_formats[result.decision.layer] = format_name(result.tensor.dtype)
    return out, layer_formats


def quantize_safetensors_stream(path: str | os.PathLike, config: QuantConfig, *, header: dict | None = None,
                                model_prefix: str = "", text_encoders: str | None = None,
                                progress: Progress | None = None, hint: str = "", budget_itemsize: int | None = None,
                                device: torch.device | str | None = None, input_name: str = "file",
                                memory_advice: str = FREE_MEMORY,
                                ) -> tuple[dict[str, torch.Tensor], dict[str, str], Report]:
    """Read `path` tensor by tensor and quantize the diffusion model's Linear weights (and, if asked, the
    text encoders'). Returns (state dict, {layer: format} for the FP8 layers of the model, Report).
    `budget_itemsize`: bytes per element of the 16-bit tensors as the host will hold them, for a memory budget.
    `device`: where the diffusion model's tensors (those under `model_prefix`) go as they are read, to be quantized
    and kept there (a GPU the model is headed to quantizes at the speed of the copy, not at the CPU's speed); text
    encoders, the VAE and non-float entries stay on the CPU. Default: the CPU.
    An I/O or out-of-memory error while reading names `input_name`, the file and the tensor, and says what to do
    (`memory_advice`: how to need less memory; quant.checkpoint.reading)."""
    header = check_safetensors(path, input_name) if header is None else header  # else checked by the caller
    metadata = header.get("__metadata__", {}) or {}
    shapes, dtypes = header_shapes_dtypes(header)
    hint = f"{hint} {os.path.basename(str(path))} {metadata.get('modelspec.title', '')} " \
           f"{metadata.get('modelspec.architecture', '')}"
    keys = sorted(shapes, key=lambda k: header[k]["data_offsets"][0])  # file order: sequential reads
    reader: _TensorReader | None = None
    with reading(path, input_name, lambda: reader and reader.key, memory_advice), open(path, "rb") as f:
        reader = _TensorReader(f, header, str(path))
        take, peek = reader.map, reader.read
        if device is not None:  # on the CPU `.to` hands back the mapped tensor itself: the same path as without
            device = torch.device(device)
            take, peek = _moved(take, device, model_prefix), _moved(peek, device, model_prefix)
        return _quantize_all(_Source(keys, shapes, dtypes, take, peek, reader.keep, metadata), config,
                             model_prefix, text_encoders, progress, hint, budget_itemsize)


def _moved(read: Callable[[str], torch.Tensor], device: torch.device, prefix: str) -> Callable[[str], torch.Tensor]:
    """`read`, with the floating-point tensors under `prefix` copied to `device` as they are read."""
    def read_to_device(key: str) -> torch.Tensor:
        tensor = read(key)
        return tensor.to(device) if key.startswith(prefix) and tensor.is_floating_point() else tensor

    return read_to_device


class _TensorReader:
    """Tensors by key from an open safetensors file (little-endian, as safetensors stores them).

    `map` gives a tensor over a private (copy-on-write) map of its own pages: the 16-bit weights about to be
    quantized are read by the quantizer straight from the page cache, with no copy into a buffer first, and the
    map goes when the tensor does, so the process holds one source tensor's pages at a time and the file is never
    written. `keep` copies a tensor out of its map when it is kept as it is (protected, norms, biases): the model
    then owns its memory. `read` copies a tensor into a buffer of its own (scales, a memory budget's re-reads).
    """

    def __init__(self, f, header: dict, path: str) -> None:
        self.f = f
        self.header = header
        self.name = os.path.basename(path)
        f.seek(0)
        self.data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        self.size = os.fstat(f.fileno()).st_size
        self.last: torch.Tensor | None = None  # the tensor `map` handed out last
        self.key: str | None = None  # the tensor read last: the one being quantized, for error messages

    def _span(self, key: str) -> tuple[torch.dtype, list[int], int, int]:
        self.key = key
        entry = self.header[key]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{self.name}: tensor {key} has dtype {entry['dtype']}, which this pack cannot read")
        start, end = (self.data_start + offset for offset in entry["data_offsets"])
        if end > self.size:  # the file shrank since its header was checked
            raise ValueError(f"{self.name} is truncated (tensor {key}); re-download it")
        return dtype, entry["shape"], start, end

    def read(self, key: str) -> torch.Tensor:
        """A tensor in a buffer of its own."""
        dtype, shape, start, end = self._span(key)
        buffer = torch.empty(end - start, dtype=torch.uint8)
        self.f.seek(start)
        if self.f.readinto(memoryview(buffer.numpy())) != end - start:
            raise ValueError(f"{self.name} is truncated (tensor {key}); re-download it")
        return buffer.view(dtype).reshape(shape)

    def map(self, key: str) -> torch.Tensor:
        """A tensor over a private map of the file's pages (valid while the tensor lives)."""
        dtype, shape, start, end = self._span(key)
        if end == start:
            return torch.empty(shape, dtype=dtype)
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        pages = mmap.mmap(self.f.fileno(), end - aligned, offset=aligned, access=mmap.ACCESS_COPY)
        tensor = torch.frombuffer(pages, dtype=torch.uint8, count=end - start, offset=start - aligned)
        self.last = tensor.view(dtype).reshape(shape)
        return self.last

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` to store, copied out if it lies in the last map (a tensor kept as it was read)."""
        last, self.last = self.last, None
        if last is not None and tensor.numel() and tensor.untyped_storage().data_ptr() == \
                last.untyped_storage().data_ptr():
            return tensor.clone()
        return tensor


def quantize_state_dict(sd: dict[str, torch.Tensor], config: QuantConfig, *, model_prefix: str = "",
                        text_encoders: str | None = None, progress: Progress | None = None, hint: str = "",
                        budget_itemsize: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str], Report]:
    """The in-memory twin of `quantize_safetensors_stream`. Consumes `sd` (pops each tensor once done)."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    dtypes = {k: v.dtype for k, v in sd.items()}
    keep_all = config.memory_budget is not None  # the budget may redo any layer from its 16-bit source: keep them all
    scales = sd if keep_all else \
        {k: v for k, v in sd.items() if k.endswith((*WEIGHT_SCALE_SUFFIXES, QUANT_ENTRY_SUFFIX))}
    source = _Source(list(sd), shapes, dtypes, sd.__getitem__ if keep_all else sd.pop, scales.__getitem__)
    result = _quantize_all(source, config, model_prefix, text_encoders, progress, hint, budget_itemsize)
    if keep_all:
        sd.clear()
    return result
