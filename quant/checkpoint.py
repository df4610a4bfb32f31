"""Reading and writing FP8 checkpoints in ComfyUI's layouts. safetensors only, never pickle.

Written layout (ComfyUI mixed precision, read by 0.3.75's own loaders and converted by newer
ones into their per-layer `comfy_quant` form): `<layer>.weight` float8, `<layer>.weight_scale`
float32 ([] or [out, 1]), header metadata `_quantization_metadata` =
{"format_version": "1.0", "layers": {"<layer>": {"format": "float8_e4m3fn"}}}.

Read layouts (quant.streaming): the above, ComfyUI 0.8.0's `.comfy_quant` entries, and ComfyUI's older
"scaled fp8" (`scaled_fp8` marker tensor, `<layer>.scale_weight`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import struct
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from .formats import dequantize_weight, quantize_weight

QUANT_METADATA_KEY = "_quantization_metadata"
LEGACY_MARKER = "scaled_fp8"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_MAX_HEADER = 100 * 1024 * 1024
# Bits per element of each safetensors dtype (the packed sub-byte ones must end on a byte boundary).
SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
                    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# The ones this pack reads into torch tensors (quant.streaming), by safetensors name.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class UnsafeFileError(ValueError):
    """A pickle-based (or otherwise non-safetensors) model file: refused unread."""


def refuse_pickle(path: str | os.PathLike, input_name: str = "file") -> dict:
    """Refuse anything but a well-formed .safetensors file, without ever unpickling it; returns its checked header
    (pass it on, e.g. to `quantize_safetensors_stream`, rather than parsing the file again)."""
    name = os.path.basename(str(path))
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        raise UnsafeFileError(f"{input_name}: {name} is a pickle-based file; this pack never unpickles model files "
                              "(loading one can run arbitrary code). Use a .safetensors version of the model, or "
                              "convert it in a sandbox.")
    return check_safetensors(path, input_name)


def check_safetensors(path: str | os.PathLike, input_name: str = "file") -> dict:
    """Parse and validate a safetensors header (truncated or corrupt files fail here, naming the input)."""
    name = os.path.basename(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{input_name}: {name} does not exist (or is not a file)")
    size = os.path.getsize(path)
    with reading(path, input_name), open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{input_name}: {name} is empty or truncated ({size} bytes); re-download it")
        (length,) = struct.unpack("<Q", head)
        too_long = length > min(_MAX_HEADER, size - 8)
        # A header length can start with the pickle/zip magic bytes (e.g. 128 = b"\x80\0..."): only a file
        # that is not plausibly safetensors is called a pickle.
        if (too_long or f.read(1) != b"{") and (head[:1] == b"\x80" or head[:2] == b"PK"):
            raise UnsafeFileError(f"{input_name}: {name} is a pickle/zip (torch.save) file, not safetensors; this "
                                  "pack never unpickles model files. Use a .safetensors version of the model.")
        f.seek(8)
        if too_long:
            raise ValueError(f"{input_name}: {name} is not a valid safetensors file (header length {length} for a "
                             f"{size}-byte file): it is truncated or corrupt; re-download it")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{input_name}: {name} has a corrupt safetensors header; re-download it")
    data_size = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise ValueError(f"{input_name}: {name} has a corrupt safetensors header (__metadata__ is not a "
                                 "table of strings); re-download it")
            continue
        problem = _entry_problem(entry, data_size)
        if problem:
            raise ValueError(f"{input_name}: {name} is truncated or corrupt (tensor {key}: {problem}); "
                             "re-download it")
    # what safetensors itself requires: the tensors tile the data section exactly, in order
    end = 0
    for key, entry in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                             key=lambda item: tuple(item[1]["data_offsets"])):
        if entry["data_offsets"][0] != end:
            raise ValueError(f"{input_name}: {name} is corrupt (tensor {key} does not start where the previous "
                             "one ends); re-download it")
        end = entry["data_offsets"][1]
    if end != data_size:
        raise ValueError(f"{input_name}: {name} is corrupt ({data_size - end} byte(s) after the last tensor); "
                         "re-download it")
    return header


FREE_MEMORY = "Free memory (close other programs, or unload other models) and run it again"


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` says memory ran out: Python's MemoryError, torch's (CUDA) OutOfMemoryError, a refused map
    (ENOMEM), or torch's CPU allocator, which raises a plain RuntimeError."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) \
        or (isinstance(err, OSError) and err.errno == errno.ENOMEM) \
        or (type(err) is RuntimeError and "can't allocate memory" in str(err))


@contextmanager
def reading(path: str | os.PathLike, input_name: str = "file", tensor: Callable[[], str | None] = lambda: None,
            memory_advice: str = FREE_MEMORY) -> Iterator[None]:
    """Re-raise an I/O or out-of-memory error from the block, chained to it, naming the input, the file, the tensor
    being read (`tensor()`, where known) and what to do; other errors (the pack's own, which name the file already)
    pass unchanged. An I/O error keeps its type (OSError or subclass); running out of memory is a MemoryError (a
    CUDA OutOfMemoryError stays one: ComfyUI unloads its models on it)."""
    try:
        yield
    except (OSError, MemoryError, RuntimeError) as err:
        key = tensor()
        where = f"{input_name}: {os.path.basename(str(path))}" + (f" (tensor {key})" if key else "")
        if out_of_memory(err):
            kind = type(err) if isinstance(err, torch.OutOfMemoryError) else MemoryError
            raise kind(f"{where}: ran out of memory while loading it ({str(err) or type(err).__name__}). "
                       f"{memory_advice}") from err
        if isinstance(err, OSError):
            raise type(err)(f"{where}: reading it failed ({err.strerror or err}). The drive or network share may "
                            "have been disconnected, or the file is damaged: reconnect the drive and run it again; "
                            "if it fails again, copy the file to another drive or re-download it") from err
        raise


def header_shapes_dtypes(header: dict) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """({key: shape}, {key: torch dtype}) of a checked header. Dtypes this pack does not read (packed sub-byte
    formats) come out as uint8: a plan refuses them as packed data if they were to be quantized."""
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    return shapes, {k: SAFETENSORS_DTYPES.get(header[k]["dtype"], torch.uint8) for k in shapes}


def _entry_problem(entry: object, data_size: int) -> str | None:
    """Why one header entry cannot be read (None if it can): dtype, shape and byte range must agree."""
    if not isinstance(entry, dict):
        return "its entry is not a table"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
        return f"unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"invalid shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"invalid data_offsets {offsets!r}"
    if offsets[1] > data_size:
        return "it ends past the end of the file"
    bits = math.prod(shape) * SAFETENSORS_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        return f"{offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}"
    if shape and shape[-1] * SAFETENSORS_BITS[dtype] % 8:  # packed rows end on a byte (safetensors' own rule)
        return f"rows of {shape[-1]} {dtype} values do not end on a byte boundary"
    return None


# What every layer we write says besides its format. ComfyUI 0.8.0 would otherwise run an FP8 layer on an FP8
# GPU as FP8 x FP8 with the activation scaled by 1.0 (values beyond +-448 clip) and needs per-tensor e4m3 for
# it; marked, it dequantizes the weight and multiplies in 16-bit, as our weight_only path does. The bench's
# stock-path table (README, "Files for stock ComfyUI") measured the choice. ComfyUI 0.3.75 reads only "format".
LAYER_MARKING = {"full_precision_matrix_mult": True}


def quantization_metadata(layer_formats: dict[str, str], model_prefix: str = "") -> str:
    """The `_quantization_metadata` header value, in the dict form ComfyUI's loader calls .get() on.

    ComfyUI 0.3.75 matches layer names relative to the diffusion model; 0.8.0 turns each entry into a
    `<name>.comfy_quant` tensor beside the full state-dict key. In all-in-one files (`model_prefix` set) both
    spellings are listed, so each version finds its own (0.8.0 leaves the relative ones unused, 0.3.75 the
    prefixed ones); diffusion-model-only files need only one.
    """
    layers = {name: {"format": fmt, **LAYER_MARKING} for name, fmt in sorted(layer_formats.items())}
    if model_prefix:
        layers.update({model_prefix + name: entry for name, entry in list(layers.items())})
    return json.dumps({"format_version": "1.0", "layers": layers})


STOCK_FORMAT = "float8_e4m3fn"
LAYOUTS = ("stock_compatible", "auto")


def to_stock_layout(sd: dict[str, torch.Tensor], layer_formats: dict[str, str], model_prefix: str = "") -> int:
    """Rewrite in place each FP8 layer that stock ComfyUI 0.8.0 cannot run natively (a per-channel scale, or
    e5m2) to one per-tensor float8_e4m3fn scale; returns how many were rewritten. Layers already per-tensor
    e4m3 keep their bits."""
    rewritten = 0
    for layer, fmt in layer_formats.items():
        weight_key, scale_key = f"{model_prefix}{layer}.weight", f"{model_prefix}{layer}.weight_scale"
        if fmt == STOCK_FORMAT and sd[scale_key].numel() == 1:
            continue
        real = dequantize_weight(sd[weight_key], sd[scale_key], torch.float32)
        sd[weight_key], sd[scale_key] = quantize_weight(real, STOCK_FORMAT, "per_tensor", name=layer)
        layer_formats[layer] = STOCK_FORMAT
        rewritten += 1
    return rewritten


def save_quantized(path: str | os.PathLike, sd: dict[str, torch.Tensor], layer_formats: dict[str, str],
                   metadata: dict[str, str] | None = None, overwrite: bool = False, model_prefix: str = "") -> Path:
    """Write `sd` atomically (temp file in the same folder, then link/rename). Never overwrites unless asked.

    `layer_formats` names the FP8 layers relative to the diffusion model, which is what ComfyUI reads even
    in all-in-one files; there the keys of `sd` carry `model_prefix` ("model.diffusion_model.").
    """
    path = Path(path)
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"output: {path.name} must end in .safetensors")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output: {path} already exists; choose another name (files are never overwritten)")
    for layer in layer_formats:
        if f"{model_prefix}{layer}.weight" not in sd or f"{model_prefix}{layer}.weight_scale" not in sd:
            raise ValueError(f"layer {layer} is listed as FP8 but {layer}.weight/.weight_scale are missing")
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    header[QUANT_METADATA_KEY] = quantization_metadata(layer_formats, model_prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh hidden name, with the permissions any new file gets (0666 less the umask), which safetensors' writer
    # narrows to 0600: a model another user, or ComfyUI running as one, could not read
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.part")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = os.stat(tmp).st_mode & 0o777
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=header)
        os.chmod(tmp, mode)
        _flush(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _flush(path: str) -> None:
    """Wait until the file's data is on the drive, before it gets its final name: a drive unplugged right after the
    save then holds the whole file under that name, not a name over missing data."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _name_taken(path: Path) -> FileExistsError:
    return FileExistsError(f"output: {path.name} appeared while saving (another save?); nothing was overwritten: run "
                           "it again to save under the next free name")


def _publish(tmp: str, path: Path) -> None:
    """Give the written temp file its final name without ever replacing a file there: a hard link (atomic: it fails
    if the name exists), or, where the filesystem refuses hard links, `_rename_into_claim`."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise _name_taken(path) from None
    except OSError:  # exFAT/FAT32 (EPERM), network shares (ENOTSUP, EXDEV, ...): any errno, the fallback is as safe
        pass
    _rename_into_claim(tmp, path)


def _rename_into_claim(tmp: str, path: Path) -> None:
    """Claim the name with an empty file created exclusively (O_EXCL: fails if the name exists), then rename the temp
    file over it, only while it is still that empty file of ours: rename works on every filesystem (exFAT, FAT32,
    network shares) and replaces only our claim. A writer that overwrites existing files anyway could still act
    between the check and the rename; every other is refused. On any error or interrupt the claim is removed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        raise _name_taken(path) from None
    try:
        try:
            ours, now = os.fstat(fd), os.stat(path)
        finally:
            os.close(fd)
        if (now.st_dev, now.st_ino, now.st_size) != (ours.st_dev, ours.st_ino, 0):
            raise _name_taken(path)  # another writer replaced or wrote into our claim: theirs stays
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            if os.stat(path).st_size == 0:  # still an empty claim (never a model: nothing of anyone's is lost)
                os.unlink(path)
        raise


def inspect_file(path: str | os.PathLike) -> dict:
    """What is in a checkpoint, from its header alone (no tensor data read)."""
    header = check_safetensors(path)
    metadata = header.pop("__metadata__", {}) or {}
    dtypes = dict(Counter(entry["dtype"] for entry in header.values()))
    total = sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in header.values())
    fp8 = [k[: -len(".weight")] for k, v in header.items() if k.endswith(".weight") and v["dtype"].startswith("F8")]
    per_channel = sum(1 for k in fp8 if len(header.get(f"{k}.weight_scale", {}).get("shape", [])) == 2)
    layout = "native" if QUANT_METADATA_KEY in metadata else \
        "scaled_fp8 (legacy)" if any(k.endswith(LEGACY_MARKER) for k in header) else \
        "fp8 without metadata" if fp8 else "16/32-bit"
    return {
        "file": os.path.basename(str(path)), "tensors": len(header), "bytes": total, "dtypes": dtypes,
        "layout": layout, "fp8_layers": len(fp8), "per_channel_layers": per_channel,
        "metadata": {k: v for k, v in metadata.items() if k != QUANT_METADATA_KEY},
    }
