"""Quantize while reading: tensor by tensor from a safetensors file.

The 16-bit model is never held whole: each tensor is read into its own buffer (plain reads,
not a memory map: mapped file pages would count in the process's resident memory for as long
as the map lives), quantized if the policy says so, and only the FP8 result is kept, so peak
host memory stays near the FP8 model's size.
`quantize_state_dict` runs the same per-tensor step over an in-memory dict (popping as it
goes), so both give bit-identical results.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping

import torch

from .checkpoint import LEGACY_MARKER, QUANT_METADATA_KEY, SAFETENSORS_DTYPES, check_safetensors
from .config import QuantConfig
from .formats import FP8_DTYPES, format_name, is_fp8, quantize_weight_with_error
from .policy import ProtectionPolicy, resolve_policy
from .quantize import quantize_table
from .report import LayerReport, Report

Progress = Callable[[int, int], None]
QUANT_ENTRY_SUFFIX = ".comfy_quant"  # ComfyUI 0.8.0's per-layer quantization entry (JSON in a uint8 tensor)

# Text-encoder prefixes in SD3.5 all-in-one checkpoints, and which `text_encoders` choice quantizes them.
TEXT_ENCODER_PREFIXES = {
    "t5xxl": "text_encoders.t5xxl.",
    "clip_g": "text_encoders.clip_g.",
    "clip_l": "text_encoders.clip_l.",
}
TEXT_ENCODER_CHOICES = {"none": (), "t5xxl_only": ("t5xxl",), "all": ("t5xxl", "clip_g", "clip_l")}
# Text-encoder 2-D weights that are not Linear layers (or are too sensitive): never FP8.
TEXT_ENCODER_KEEP = ("embed", "shared", "relative_attention_bias", "text_projection", "position")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Quantizer:
    """The per-tensor step shared by the streaming and the in-memory paths."""

    def __init__(self, config: QuantConfig, policy: ProtectionPolicy, model_prefix: str,
                 text_encoders: tuple[str, ...], legacy: bool = False) -> None:
        self.config = config
        self.policy = policy
        self.model_prefix = model_prefix
        self.te_prefixes = tuple(TEXT_ENCODER_PREFIXES[e] for e in text_encoders)
        self.already_fp8 = False
        self.legacy = legacy  # older ComfyUI scaled_fp8 file: it may hold unscaled fp8 biases
        self.report = Report(rule=policy.rule, warnings=list(policy.warnings), fp8_format=config.fp8_format,
                             scaling=config.scaling, backend=config.backend)
        self.layer_formats: dict[str, str] = {}

    def _target(self, key: str, tensor: torch.Tensor) -> tuple[str | None, bool]:
        """(name relative to its model or None, quantize?) for one key."""
        if key.startswith(self.model_prefix):
            rel = key[len(self.model_prefix):]
            if rel.endswith(".weight") and tensor.dim() == 2:
                return rel, self.policy.should_quantize(rel[: -len(".weight")], tuple(tensor.shape))
            return rel, False
        for prefix in self.te_prefixes:
            if key.startswith(prefix) and key.endswith(".weight") and tensor.dim() == 2:
                return None, not any(word in key for word in TEXT_ENCODER_KEEP)
        return None, False

    def step(self, key: str, tensor: torch.Tensor, scale_for: Callable[[str], torch.Tensor | None]) \
            -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the output tensors for one input tensor."""
        rel, quantize = self._target(key, tensor)
        name = (rel or key).removesuffix(".weight")
        if key.endswith((".scale_weight", ".weight_scale", ".input_scale", ".scale_input")) or \
                key.endswith(LEGACY_MARKER):
            return  # emitted together with their weight (or dropped: we scale activations dynamically)
        if rel in self.policy.unit_scale:
            yield key, quantize_table(rel, tensor, self.config.fp8_format, self.report)
            return
        if is_fp8(tensor):
            scale = scale_for(key[: -len(".weight")]) if key.endswith(".weight") else None
            if scale is None and self.legacy:
                yield key, tensor.to(torch.float16)  # legacy files store some tensors as bare fp8
                return
            if scale is None:
                raise ValueError(f"{key} is {tensor.dtype} without a weight_scale/scale_weight: "
                                 "not a scaled FP8 file this pack can read")
            if rel is not None:
                self.layer_formats[name] = format_name(tensor.dtype)
            size = _nbytes(tensor) + _nbytes(scale)
            self.report.add(LayerReport(name, tuple(tensor.shape), str(tensor.dtype), str(tensor.dtype), size, size,
                                        None, "kept"))
            self.already_fp8 = True
            yield key, tensor
            yield key[: -len(".weight")] + ".weight_scale", scale.float()
            return
        if quantize and not tensor.is_floating_point():
            raise UnsupportedQuantFormat(f"{key} is {tensor.dtype}: packed quantized data, not a weight this pack "
                                         "can quantize. Load this file with ComfyUI's own loader")
        if quantize:
            qweight, scale, err = quantize_weight_with_error(tensor, self.config.fp8_format, self.config.scaling,
                                                             name=name)
            self.report.add(LayerReport(name, tuple(tensor.shape), str(tensor.dtype), str(qweight.dtype),
                                        _nbytes(tensor), _nbytes(qweight) + _nbytes(scale), err, "fp8"))
            if rel is not None:
                self.layer_formats[name] = self.config.fp8_format
            yield key, qweight
            yield key[: -len(".weight")] + ".weight_scale", scale
            return
        if rel is not None:
            action = "protected" if (rel.endswith(".weight") and tensor.dim() == 2) or rel in self.policy.protected \
                else "kept"
            self.report.add(LayerReport(name if action == "protected" else rel, tuple(tensor.shape), str(tensor.dtype),
                                        str(tensor.dtype), _nbytes(tensor), _nbytes(tensor), None, action))
        yield key, tensor

    def finish(self) -> Report:
        if self.already_fp8:
            self.report.warnings.append("the input already holds FP8 layers: they were kept as they are")
        elif self.report.n_fp8 == 0:
            self.report.warnings.append("no layer was quantized: check protect_preset / protect_patterns")
        return self.report


class UnsupportedQuantFormat(ValueError):
    """A layer stored in a quantized format other than scaled FP8 (nvfp4, mxfp8, int8, ...)."""


def _declared_formats(metadata: Mapping[str, str], quant_entries: Mapping[str, bytes]) -> dict[str, str]:
    """{layer: format} that a file declares: its `_quantization_metadata` header (values are dicts, or bare
    strings as ComfyUI's QUANTIZATION.md shows them) and ComfyUI 0.8.0's per-layer `<layer>.comfy_quant` tensors."""
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
    return declared


def _refuse_unknown_formats(declared: Mapping[str, str]) -> None:
    """Packed formats are never read as floats (that would re-quantize their bytes): refuse, naming the layer."""
    for layer, fmt in sorted(declared.items()):
        if fmt not in FP8_DTYPES:
            raise UnsupportedQuantFormat(
                f"{layer} is stored as {fmt!r}, a quantized format this pack does not read (it reads float8_e4m3fn "
                "and float8_e5m2 layers). Load this file with ComfyUI's own loader, or quantize a 16-bit file")


def _diffusion_shapes(shapes: Mapping[str, tuple[int, ...]], model_prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(model_prefix):]: s for k, s in shapes.items() if k.startswith(model_prefix)}


def _check_text_encoders(text_encoders: str | None) -> tuple[str, ...]:
    if text_encoders is None:
        return ()
    if text_encoders not in TEXT_ENCODER_CHOICES:
        raise ValueError(f"text_encoder_fp8: {text_encoders!r} is not one of {list(TEXT_ENCODER_CHOICES)}")
    return TEXT_ENCODER_CHOICES[text_encoders]


def _quantize_all(keys: list[str], shapes: Mapping[str, tuple[int, ...]], take: Callable[[str], torch.Tensor],
                  peek: Callable[[str], torch.Tensor], config: QuantConfig, model_prefix: str,
                  text_encoders: str | None, progress: Progress | None, hint: str,
                  keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, metadata: Mapping[str, str] = {},
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str], Report]:
    """Both entry points: `take` yields each tensor once (read or popped), `peek` fetches a tensor by key (scales,
    quantization entries), `keep` makes an output tensor safe to hold (the reader's scratch buffer is reused)."""
    entries = {k[: -len(QUANT_ENTRY_SUFFIX)]: peek(k).numpy().tobytes() for k in keys if k.endswith(QUANT_ENTRY_SUFFIX)}
    _refuse_unknown_formats(_declared_formats(metadata, entries))
    keys = [k for k in keys if not k.endswith(QUANT_ENTRY_SUFFIX)]  # we write our own metadata
    if model_prefix and not any(k.startswith(model_prefix) for k in shapes):
        model_prefix = ""
    policy = resolve_policy(config, _diffusion_shapes(shapes, model_prefix), hint)
    legacy = any(k.endswith(LEGACY_MARKER) for k in shapes)
    quantizer = _Quantizer(config, policy, model_prefix, _check_text_encoders(text_encoders), legacy)

    def scale_for(layer: str) -> torch.Tensor | None:
        for suffix in (".weight_scale", ".scale_weight"):
            if layer + suffix in shapes:
                return peek(layer + suffix)
        return None

    # Tables first (pos_embed: 9% of Medium): their 16-bit copy is then briefly held beside the FP8 one while
    # little else is, instead of on top of the whole FP8 model at the end.
    tables = {model_prefix + name for name in policy.unit_scale}
    keys = sorted(keys, key=lambda k: k not in tables)
    out: dict[str, torch.Tensor] = {}
    for index, key in enumerate(keys):
        for out_key, tensor in quantizer.step(key, take(key), scale_for):
            out[out_key] = keep(tensor)
        if progress is not None:
            progress(index + 1, len(keys))
    return out, quantizer.layer_formats, quantizer.finish()


def quantize_safetensors_stream(path: str | os.PathLike, config: QuantConfig, *, header: dict | None = None,
                                model_prefix: str = "",
                                text_encoders: str | None = None, progress: Progress | None = None,
                                hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str], Report]:
    """Read `path` tensor by tensor and quantize the diffusion model's Linear weights (and, if asked, the
    text encoders'). Returns (state dict, {layer: format} for the FP8 layers of the model, Report)."""
    header = check_safetensors(path) if header is None else header  # `header`: already checked by the caller
    metadata = header.get("__metadata__", {}) or {}
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    hint = f"{hint} {os.path.basename(str(path))} {metadata.get('modelspec.title', '')} " \
           f"{metadata.get('modelspec.architecture', '')}"
    keys = sorted(shapes, key=lambda k: header[k]["data_offsets"][0])  # file order: sequential reads
    with open(path, "rb") as f:
        reader = _TensorReader(f, header, str(path))
        return _quantize_all(keys, shapes, reader.read_scratch, reader.read, config, model_prefix, text_encoders,
                             progress, hint, keep=reader.keep, metadata=metadata)


class _TensorReader:
    """Tensors by key from an open safetensors file (little-endian, as safetensors stores them).

    `read_scratch` reads into one buffer reused for every key: the 16-bit weights about to be quantized and
    dropped. A fresh buffer each would leave the allocator's heap holding freed 16-bit blocks between the
    FP8 ones that stay, which it cannot give back to the OS: peak memory would grow to 16-bit + FP8.
    Tensors over SCRATCH_LIMIT get a buffer of their own (blocks that large are mapped by the allocator and
    unmapped when freed), so one big table does not size the scratch buffer for the whole load.
    `keep` copies a tensor out of the scratch buffer when it is kept as it is (protected, norms, biases).
    """

    SCRATCH_LIMIT = 64 << 20

    def __init__(self, f, header: dict, path: str) -> None:
        self.f = f
        self.header = header
        self.name = os.path.basename(path)
        f.seek(0)
        self.data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        sizes = [e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__"]
        self.scratch = torch.empty(max((n for n in sizes if n <= self.SCRATCH_LIMIT), default=0), dtype=torch.uint8)

    def _read_into(self, buffer: torch.Tensor, key: str) -> torch.Tensor:
        entry = self.header[key]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{self.name}: tensor {key} has dtype {entry['dtype']}, which this pack cannot read")
        start, end = entry["data_offsets"]
        buffer = buffer[: end - start]
        self.f.seek(self.data_start + start)
        if self.f.readinto(memoryview(buffer.numpy())) != end - start:
            raise ValueError(f"{self.name} is truncated (tensor {key}); re-download it")
        return buffer.view(dtype).reshape(entry["shape"])

    def read(self, key: str) -> torch.Tensor:
        """A tensor in a buffer of its own."""
        start, end = self.header[key]["data_offsets"]
        return self._read_into(torch.empty(end - start, dtype=torch.uint8), key)

    def read_scratch(self, key: str) -> torch.Tensor:
        """A tensor in the shared scratch buffer (valid until the next read_scratch), or its own if too big."""
        start, end = self.header[key]["data_offsets"]
        return self._read_into(self.scratch, key) if end - start <= self.scratch.numel() else self.read(key)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        in_scratch = tensor.numel() > 0 and tensor.untyped_storage().data_ptr() == self.scratch.data_ptr()
        return tensor.clone() if in_scratch else tensor


def quantize_state_dict(sd: dict[str, torch.Tensor], config: QuantConfig, *, model_prefix: str = "",
                        text_encoders: str | None = None, progress: Progress | None = None,
                        hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str], Report]:
    """The in-memory twin of `quantize_safetensors_stream`. Consumes `sd` (pops each tensor once done)."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    scales = {k: v for k, v in sd.items() if k.endswith((".weight_scale", ".scale_weight", QUANT_ENTRY_SUFFIX))}
    return _quantize_all(list(sd), shapes, sd.pop, scales.__getitem__, config, model_prefix, text_encoders,
                         progress, hint)
