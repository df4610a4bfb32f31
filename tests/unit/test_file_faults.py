"""Files on external drives and network shares (issue 29): saves where the filesystem refuses hard links (exFAT,
FAT32, many shares), and I/O or memory errors while the engine streams a model file. A save never overwrites and
never leaves a partial file under its name; a read error names the file, the tensor and what to do, and the next
run is right."""

from __future__ import annotations

import errno
import itertools
import os

import pytest
import torch
from safetensors.torch import load_file

from sd35_fp8.quant import QuantConfig
from sd35_fp8.quant import checkpoint as checkpoint
from sd35_fp8.quant import plan as plan
from sd35_fp8.quant import streaming as streaming
from sd35_fp8.quant.checkpoint import FREE_MEMORY, check_safetensors, save_quantized
from sd35_fp8.quant.cli import main as cli_main
from sd35_fp8.quant.streaming import quantize_safetensors_stream
from tools.faults import fail_tensor_map

# what filesystems without hard links answer link(2) with: exFAT/FAT32 (EPERM), shares and FUSE (ENOTSUP, EXDEV)
NO_LINK_ERRNOS = [errno.EPERM, errno.ENOTSUP, errno.EXDEV]


def _model() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 16, generator=gen)
    scale = weight.abs().amax(dim=1, keepdim=True) / 448
    sd = {"a.weight": (weight / scale).to(torch.float8_e4m3fn), "a.weight_scale": scale,
          "a.bias": torch.randn(32, generator=gen).half(), "norm.weight": torch.ones(16, dtype=torch.float16)}
    return sd, {"a": "float8_e4m3fn"}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1).view(torch.uint8),
                                                                                  b[k].reshape(-1).view(torch.uint8))
                                        for k in a)


@pytest.fixture(params=NO_LINK_ERRNOS, ids=errno.errorcode.get)
def no_hard_links(request, monkeypatch) -> list:
    """os.link refused as such a filesystem refuses it; returns the names it was asked to make."""
    asked = []

    def refuse(src, dst, *args, **kwargs):
        asked.append(os.fspath(dst))
        raise OSError(request.param, os.strerror(request.param))  # OSError picks the subclass: PermissionError...

    monkeypatch.setattr(os, "link", refuse)
    return asked


def test_save_without_hard_links_writes_the_file(tmp_path, no_hard_links):
    sd, formats = _model()
    target = tmp_path / "m.safetensors"
    assert save_quantized(target, sd, formats, metadata={"note": "kept"}) == target
    assert no_hard_links == [str(target)], "the link was not tried first"
    assert _same(load_file(str(target)), sd)
    metadata = check_safetensors(target)["__metadata__"]
    assert metadata["note"] == "kept" and "_quantization_metadata" in metadata
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temp file, no claim left


@pytest.mark.parametrize("links", [True, False], ids=["links", "no_links"])
def test_a_saved_file_has_the_permissions_of_any_new_file(tmp_path, monkeypatch, links):
    """0666 less the umask, as the user's other files: not a temp file's 0600, which another user (or ComfyUI
    running as one) could not read."""
    if not links:
        monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    umask = os.umask(0o022)
    try:
        target = save_quantized(tmp_path / "m.safetensors", *_model())
    finally:
        os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o644


def test_save_without_hard_links_never_overwrites(tmp_path, no_hard_links, monkeypatch):
    sd, formats = _model()
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"someone's model")
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_quantized(target, sd, formats)
    assert target.read_bytes() == b"someone's model"

    real_save = checkpoint.save_file
    late = tmp_path / "late.safetensors"

    def other_writer_meanwhile(tensors, filename, metadata=None):  # the name is taken while we write the temp file
        real_save(tensors, filename, metadata=metadata)
        late.write_bytes(b"another save")

    monkeypatch.setattr(checkpoint, "save_file", other_writer_meanwhile)
    with pytest.raises(FileExistsError, match="appeared while saving.*nothing was overwritten"):
        save_quantized(late, sd, formats)
    assert late.read_bytes() == b"another save"
    assert sorted(os.listdir(tmp_path)) == ["late.safetensors", "m.safetensors"]


def test_a_writer_into_our_claim_keeps_its_file(tmp_path, no_hard_links, monkeypatch):
    """Another writer that opens the claimed name without O_EXCL (overwriting) and writes: its file stays, ours
    is not renamed over it."""
    sd, formats = _model()
    target = tmp_path / "m.safetensors"
    real_fstat = os.fstat

    def fstat_then_other_writer(fd):
        result = real_fstat(fd)
        if target.exists() and target.stat().st_size == 0:
            target.write_bytes(b"written into the claim")
        return result

    monkeypatch.setattr(os, "fstat", fstat_then_other_writer)
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        save_quantized(target, sd, formats)
    assert target.read_bytes() == b"written into the claim"
    assert os.listdir(tmp_path) == ["m.safetensors"]


@pytest.mark.parametrize("fault", ["disk_full", "interrupt"])
@pytest.mark.parametrize("when", ["writing", "renaming"])
def test_fault_without_hard_links_leaves_nothing_under_the_name(tmp_path, no_hard_links, monkeypatch, fault, when):
    sd, formats = _model()
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        if when == "writing":
            with open(args[1], "wb") as f:
                f.write(b"half a file")
        if fault == "interrupt":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    if when == "writing":
        monkeypatch.setattr(checkpoint, "save_file", fail)
    else:  # the name is claimed (an empty file) and the rename over it fails
        monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt if fault == "interrupt" else OSError):
        save_quantized(tmp_path / "m.safetensors", sd, formats)
    assert calls, "the fault was not reached"
    assert os.listdir(tmp_path) == [], "a partial file, a temp file or the claim was left behind"


def test_cli_convert_without_hard_links_writes_the_same_file(fixture_files, tmp_path, no_hard_links, monkeypatch):
    source = str(fixture_files["large_transformer"])
    assert cli_main(["convert", source, str(tmp_path / "m.safetensors")]) == 0
    assert no_hard_links == [str(tmp_path / "m.safetensors")]
    (tmp_path / "kept.safetensors").write_bytes(b"keep me")
    assert cli_main(["convert", source, str(tmp_path / "kept.safetensors")]) == 2
    assert (tmp_path / "kept.safetensors").read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["kept.safetensors", "m.safetensors"]
    monkeypatch.undo()  # hard links again: the same tensors and metadata
    assert cli_main(["convert", source, str(tmp_path / "linked.safetensors")]) == 0
    written, linked = tmp_path / "m.safetensors", tmp_path / "linked.safetensors"
    assert _same(load_file(str(written)), load_file(str(linked)))
    assert check_safetensors(written)["__metadata__"] == check_safetensors(linked)["__metadata__"]


# --------------------------------------------------------------------------- read faults while streaming

def _fail_at(monkeypatch, n: int, error: BaseException, prefix: str = "") -> list[tuple[str, str]]:
    """The n-th tensor under `prefix` fails to map with `error`; returns the (file, key) pairs mapped so far."""
    return fail_tensor_map(monkeypatch, streaming._TensorReader, n, error, prefix)


@pytest.mark.parametrize("fault", ["io", "memory"])
def test_read_fault_mid_stream_names_file_tensor_and_fix(fixture_files, monkeypatch, fault):
    path = fixture_files["large_transformer"]
    expected, formats, _ = quantize_safetensors_stream(path, QuantConfig())
    original = OSError(errno.EIO, "Input/output error") if fault == "io" else MemoryError()
    mapped = _fail_at(monkeypatch, 6, original)
    with pytest.raises(OSError if fault == "io" else MemoryError) as caught:
        quantize_safetensors_stream(path, QuantConfig(), input_name="model_name", memory_advice="Do less.")
    text = str(caught.value)
    assert len(mapped) == 6, "the fault did not hit mid-stream"
    assert text.startswith(f"model_name: {path.name} (tensor {mapped[-1][1]}): "), text
    if fault == "io":
        assert "reading it failed (Input/output error)" in text and "reconnect the drive" in text
        assert "re-download it" in text
    else:
        assert "ran out of memory" in text and text.endswith("Do less.")
    assert caught.value.__cause__ is original
    monkeypatch.undo()
    again, again_formats, _ = quantize_safetensors_stream(path, QuantConfig())  # the next run is right
    assert _same(again, expected) and again_formats == formats


def test_out_of_memory_while_quantizing_names_the_tensor(fixture_files, monkeypatch):
    """torch's CPU allocator says it with a plain RuntimeError; the default advice is to free memory."""
    real = plan.quantize_weight_with_error
    calls = itertools.count(1)
    seen = []

    def failing(weight, fmt, scaling, name=""):
        seen.append(name)
        if next(calls) == 3:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                               "tried to allocate 4096 bytes. Error code 12 (Cannot allocate memory)")
        return real(weight, fmt, scaling, name=name)

    monkeypatch.setattr(plan, "quantize_weight_with_error", failing)
    path = fixture_files["large_transformer"]
    with pytest.raises(MemoryError, match=rf"file: {path.name} \(tensor .*ran out of memory.*can't allocate") as caught:
        quantize_safetensors_stream(path, QuantConfig())
    assert f"(tensor {seen[-1]}.weight)" in str(caught.value) and str(caught.value).endswith(FREE_MEMORY)
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_other_errors_pass_unchanged(fixture_files, monkeypatch):
    bug = RuntimeError("a bug, not a read error")
    _fail_at(monkeypatch, 3, bug)
    with pytest.raises(RuntimeError) as caught:
        quantize_safetensors_stream(fixture_files["large_transformer"], QuantConfig())
    assert caught.value is bug


def test_io_error_at_a_text_encoder_tensor_names_it(fixture_files, monkeypatch):
    path = fixture_files["large_all_in_one"]
    mapped = _fail_at(monkeypatch, 4, OSError(errno.EIO, "Input/output error"), prefix="text_encoders.")
    with pytest.raises(OSError, match=r"\(tensor text_encoders\.[^)]+\): reading it failed") as caught:
        quantize_safetensors_stream(path, QuantConfig(), model_prefix="model.diffusion_model.",
                                    text_encoders="all")
    assert f"(tensor {mapped[-1][1]})" in str(caught.value) and len(mapped) > 4


def test_cli_read_error_is_one_line_and_writes_nothing(fixture_files, tmp_path, monkeypatch, capsys):
    _fail_at(monkeypatch, 5, OSError(errno.EIO, "Input/output error"))
    source = fixture_files["large_transformer"]
    assert cli_main(["convert", str(source), str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"error: input: {source.name} (tensor " in err and "reconnect the drive" in err
    assert os.listdir(tmp_path) == []
