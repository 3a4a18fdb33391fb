"""Shared-memory slots through which decoding processes hand decoded batches to the reader.

A decoded 224 px batch of 32 is 4.8 MB. Returned from a process pool, it is pickled, written through a pipe, read,
unpickled and then copied into a tensor: four copies and a few hundred system calls per batch, most of them in the
training process, whose cores should train. Instead the reader owns a ring of slots in one shared-memory segment;
a decoding process writes its batch straight into the slot the reader names, and the reader copies it out once.

With at most ``slots`` batches in flight, and each slot copied out before the batch ``slots`` places later is sent
to it, a slot is never written while it is read. Rings are lent (:func:`lent_ring`) and kept between readers of the
same geometry: a reader lives one epoch, and the pages of a new segment are faulted in afresh on both sides (in the
reader alone 2.5 ms to copy out a new 4.8 MB slot against 0.3 ms for one already mapped). Decoding processes import
this module, which imports neither torch nor ray.

The encoded images travel the other way the same way (:class:`PayloadSlots`): the reader writes each batch's JPEG
bytes into a slot of a second ring and sends their offsets. Pickled through the pool's pipe, a batch's megabyte
cost the reader 1-2 ms of CPU on the 2-core machine, and the decoding process about as much to read it back.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
        # False once a decoding process may still write into a slot after its reader stopped: such a ring is never
        # lent again, or that late write could land in the next reader's batch.
        self.reusable = True

    @property
    def closed(self) -> bool:
        return self._memory is None

    def view(self, slot: int) -> np.ndarray:
        """Slot ``slot`` as an array; valid until the ring is closed, its contents until the slot is reused."""
        if self._memory is None:
            raise ValueError("the slot ring is closed")
        return _array(self._memory, slot, self.shape)

    def close(self) -> None:
        memory, self._memory = self._memory, None
        if memory is not None:
            _unmap(memory)
            memory.unlink()  # the name goes now, so no other process can attach

    def __enter__(self) -> SlotRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unmap(memory: SharedMemory) -> None:
    """Close this process's mapping of ``memory``, unless an array still views it: then the mapping stays for the
    life of the process (closing it would leave the array dangling)."""
    try:
        memory.close()
    except BufferError:
        _outlived.append(memory)


# Idle rings of this process, least recently returned first; at most IDLE_MAX are kept (a process reads with one
# geometry per cell, and a reader holds two rings, its decoded batches and its encoded images: more would only
# hold memory).
_idle: list[SlotRing] = []
_idle_lock = threading.Lock()
_exiting = False
IDLE_MAX = 4


@contextlib.contextmanager
def lent_ring(slots: int, shape: tuple[int, ...]) -> Iterator[SlotRing]:
    """A ring of ``slots`` x ``shape`` for one reader: an idle one of this process if there is one, else a new one;
    kept afterwards for the next reader unless it was marked not ``reusable`` (then closed and unlinked)."""
    shape = tuple(shape)
    with _idle_lock:
        ring = next((r for r in reversed(_idle) if r.slots == slots and r.shape == shape), None)
        if ring is not None:
            _idle.remove(ring)
    if ring is None:
        ring = SlotRing(slots, shape)
    try:
        yield ring
    finally:
        retired = [ring]
        if ring.reusable and not ring.closed:
            with _idle_lock:
                if not _exiting:
                    _idle.append(ring)
                    retired = _idle[:-IDLE_MAX]
                    del _idle[:-IDLE_MAX]
        for old in retired:
            old.close()


def close_idle_rings() -> None:
    """Close and unlink every idle ring of this process."""
    with _idle_lock:
        rings = list(_idle)
        _idle.clear()
    for ring in rings:
        ring.close()


@atexit.register
def _at_exit() -> None:
    # A reader finished from here on closes its ring instead of keeping it. A process killed before this runs
    # leaves its rings to multiprocessing's resource tracker, which unlinks them once the process tree is gone.
    global _exiting
    _exiting = True
    close_idle_rings()


def _array(memory: SharedMemory, slot: int, shape: tuple[int, ...]) -> np.ndarray:
    # frombuffer holds a buffer export while the array lives, so closing the segment under it raises instead of
    # leaving a dangling array (np.ndarray(buffer=...) holds none: reading it after close crashes the process).
    size, buffer = math.prod(shape), memory.buf
    if buffer is None:
        raise ValueError(f"shared memory {memory.name} is closed")
    return np.frombuffer(buffer, np.uint8, count=size, offset=slot * size).reshape(shape)


# In a decoding process: the segments it last wrote to, most recent last (its reader's rings, kept across epochs).
_attached: dict[str, SharedMemory] = {}
ATTACHED_MAX = 4
_SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory, by name


def _detach(name: str) -> None:
    _unmap(_attached.pop(name))  # a view that outlived a failed task keeps its mapping, and this task goes on


def _attach(name: str) -> SharedMemory:
    # Segments their reader unlinked (retired rings) are let go at once, not kept mapped until evicted.
    if os.path.isdir(_SHM_DIR):
        for old in [n for n in _attached if n != name and not os.path.exists(os.path.join(_SHM_DIR, n))]:
            _detach(old)
    memory = _attached.pop(name, None)
    if memory is None:
        while len(_attached) >= ATTACHED_MAX:
            _detach(next(iter(_attached)))
        # Attaching registers the name with the resource tracker again; decoding processes share their parent's
        # tracker (forkserver passes it on), whose registry is a set, so the creator's unlink still settles it.
        memory = SharedMemory(name=name)
    _attached[name] = memory
    return memory


def fill_slot(name: str, slot: int, shape: tuple[int, ...], fn: Callable[..., Any], *args: Any) -> tuple[int, Any]:
    """In a decoding process: ``fn(*args, out=<slot>)`` written into slot ``slot`` of the ring ``name``, each
    :class:`Packed` argument read back into its list of byte strings first. fn returns the rows it filled, or
    (those rows, something small to send back); fill_slot returns (how many rows, that something or None)."""
    args = tuple(_unpacked(a) if isinstance(a, Packed) else a for a in args)
    memory = _attach(name)
    out = _array(memory, slot, shape)
    result = fn(*args, out=out)
    rows, extra = result if isinstance(result, tuple) else (result, None)
    filled = len(rows)
    del out, rows, result  # no view may outlive the call: closing the segment later would fail on an exported buffer
    return filled, extra


# ------------------------------------------------------------------------------------------------------------
# Encoded images, reader to decoding processes


@dataclass(frozen=True)
class Packed:
    """Byte strings written back to back into slot ``slot`` of the byte ring ``name`` (``capacity`` bytes a slot),
    string i ending at ``ends[i]``: what a task carries instead of the strings."""

    name: str
    slot: int
    capacity: int
    ends: tuple[int, ...]


class PayloadSlots:
    """The byte slots a reader writes each task's encoded images into, one lent ring of ``slots`` (the same
    number, and the same reuse rule, as its ring of decoded batches: slot k is rewritten only once task k's batch
    came back, so after its decoding process read it).

    The ring is sized at the first batch, to twice its bytes rounded up to a power of two (at least 1 MiB), so
    readers of one dataset find the same geometry and reuse it; a later batch too large for a slot is sent as it
    is, through the pipe.
    """

    MIN_CAPACITY = 1 << 20

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._lent = contextlib.ExitStack()
        self._ring: SlotRing | None = None
        self.reusable = True

    def pack(self, slot: int, items: list[bytes]) -> Packed | list[bytes]:
        ends = tuple(int(end) for end in np.cumsum([len(b) for b in items]))
        total = ends[-1] if ends else 0
        if self._ring is None:
            capacity = max(self.MIN_CAPACITY, 1 << (2 * total - 1).bit_length())
            self._ring = self._lent.enter_context(lent_ring(self.slots, (capacity,)))
        if total > self._ring.slot_bytes:
            return items
        view = self._ring.view(slot)
        start = 0
        for item, end in zip(items, ends, strict=True):
            view[start:end] = np.frombuffer(item, np.uint8)
            start = end
        del view
        return Packed(self._ring.name, slot, self._ring.slot_bytes, ends)

    def close(self) -> None:
        """Return the ring (closed and unlinked instead, once marked not ``reusable``: a decoding process may still
        read a slot)."""
        if self._ring is not None and not self.reusable:
            self._ring.reusable = False
        self._lent.close()


def _unpacked(packed: Packed) -> list[bytes]:
    memory = _attach(packed.name)
    buffer = memory.buf
    if buffer is None:
        raise ValueError(f"shared memory {packed.name} is closed")
    slot = buffer[packed.slot * packed.capacity : (packed.slot + 1) * packed.capacity]
    try:
        starts = (0, *packed.ends[:-1]) if packed.ends else ()
        return [bytes(slot[a:b]) for a, b in zip(starts, packed.ends, strict=True)]
    finally:
        slot.release()
