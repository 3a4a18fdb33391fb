"""Shared-memory slots through which decoding processes hand decoded batches to the reader.

A decoded 224 px batch of 32 is 4.8 MB. Returned from a process pool, it is pickled, written through a pipe, read,
unpickled and then copied into a tensor: four copies and a few hundred system calls per batch, most of them in the
training process, whose cores should train. Instead the reader owns a ring of slots in one shared-memory segment;
a decoding process writes its batch straight into the slot the reader names, and the reader copies it out once.

With at most ``slots`` batches in flight, and each slot copied out before the batch ``slots`` places later is sent
to it, a slot is never written while it is read. Decoding processes import this module, which imports neither torch
nor ray.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

# Segments closed while an array still viewed them (see SlotRing.close).
_outlived: list[SharedMemory] = []


class SlotRing:
    """``slots`` uint8 arrays of ``shape`` in one shared-memory segment, owned (and unlinked) by its creator."""

    def __init__(self, slots: int, shape: tuple[int, ...]) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots, self.shape = slots, shape
        self.slot_bytes = math.prod(shape)
        # Unlinked by close(), or by multiprocessing's resource tracker if this process dies first.
        self._memory: SharedMemory | None = SharedMemory(create=True, size=slots * self.slot_bytes)
        self.name = self._memory.name

    def view(self, slot: int) -> np.ndarray:
        """Slot ``slot`` as an array; valid until the ring is closed, its contents until the slot is reused."""
        if self._memory is None:
            raise ValueError("the slot ring is closed")
        return _array(self._memory, slot, self.shape)

    def close(self) -> None:
        memory, self._memory = self._memory, None
        if memory is not None:
            try:
                memory.close()
            except BufferError:
                # A view is still held: its mapping stays for the life of this process (closing it would leave
                # the view dangling); the name goes now, so no other process can attach.
                _outlived.append(memory)
            memory.unlink()

    def __enter__(self) -> SlotRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _array(memory: SharedMemory, slot: int, shape: tuple[int, ...]) -> np.ndarray:
    # frombuffer holds a buffer export while the array lives, so closing the segment under it raises instead of
    # leaving a dangling array (np.ndarray(buffer=...) holds none: reading it after close crashes the process).
    size, buffer = math.prod(shape), memory.buf
    if buffer is None:
        raise ValueError(f"shared memory {memory.name} is closed")
    return np.frombuffer(buffer, np.uint8, count=size, offset=slot * size).reshape(shape)


# In a decoding process: the segment it last wrote to. A reader makes a new ring per epoch, so one is kept open.
_attached: dict[str, SharedMemory] = {}


def _attach(name: str) -> SharedMemory:
    memory = _attached.get(name)
    if memory is None:
        for old in _attached.values():
            old.close()
        _attached.clear()
        # Attaching registers the name with the resource tracker again; decoding processes share their parent's
        # tracker (forkserver passes it on), whose registry is a set, so the creator's unlink still settles it.
        memory = _attached[name] = SharedMemory(name=name)
    return memory


def fill_slot(name: str, slot: int, shape: tuple[int, ...], fn: Callable[..., np.ndarray], *args: Any) -> int:
    """In a decoding process: ``fn(*args, out=<slot>)`` written into slot ``slot`` of the ring ``name``; returns
    how many rows it filled."""
    memory = _attach(name)
    out = _array(memory, slot, shape)
    filled = len(fn(*args, out=out))
    del out  # no view may outlive the call: closing the segment later would fail on an exported buffer
    return filled
