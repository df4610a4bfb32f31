"""Faults injected into the engine's file reader for the tests (unit and integration): a tensor whose pages fail
to map, as an I/O error or running out of memory does in the middle of a stream."""

from __future__ import annotations

import itertools
import mmap


def fail_tensor_map(monkeypatch, reader_class: type, n: int, error: BaseException,
                    prefix: str = "") -> list[tuple[str, str]]:
    """Make mmap raise `error` for the n-th tensor under `prefix` that `reader_class` (quant.streaming._TensorReader,
    as the caller imported it) maps; returns the (file name, key) pairs it was asked to map so far."""
    real_map, real_mmap = reader_class.map, mmap.mmap
    mapped: list[tuple[str, str]] = []
    count = itertools.count(1)

    def map_counting(self, key):
        mapped.append((getattr(self, "name", ""), key))
        failing = key.startswith(prefix) and next(count) == n

        def mmap_or_fail(*args, **kwargs):
            if failing:
                raise error
            return real_mmap(*args, **kwargs)

        monkeypatch.setattr(mmap, "mmap", mmap_or_fail)
        return real_map(self, key)

    monkeypatch.setattr(reader_class, "map", map_counting)
    return mapped
