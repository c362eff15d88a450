"""What the server and its executor processes say to each other.

One AF_UNIX SOCK_SEQPACKET socket per instance: each message is one packet
(no framing to parse), and file descriptors of shared-memory slabs travel with
it (SCM_RIGHTS). Both ends are this package, so messages are pickled tuples.
Tensor data never travels on the socket: it sits in memfd slabs that both
processes map, and the messages carry only where each tensor lies.

Slabs are anonymous memfds: nothing to name, unlink or leak; the memory goes
away when the last process holding it closes it or dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import mmap
import os
import pickle
import socket
from typing import Any

import numpy as np

from sluice import _core

Array = np.ndarray[Any, Any]

MAX_MESSAGE_BYTES = 1 << 20  # descriptors only; far below the socket's limit
ALIGN = 64  # each tensor starts on a cache line


def send(sock: socket.socket, message: tuple[Any, ...], fds: list[int] | None = None) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[tuple[Any, ...] | None, list[int]]:
    """One message and the descriptors that came with it; (None, []) at EOF.
    Raises BlockingIOError on a non-blocking socket with nothing to read."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES, 4)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    if flags & socket.MSG_TRUNC:
        for fd in fds:
            os.close(fd)
        raise ValueError("executor message truncated")
    return pickle.loads(data), list(fds)


class Slab:
    """A shared-memory region: a memfd mapped into this process."""

    def __init__(self, size_bytes: int, fd: int | None = None) -> None:
        self.size = max(ALIGN, size_bytes)
        if fd is None:
            fd = os.memfd_create("sluice-slab", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.size)
        self.fd = fd
        self.mm = mmap.mmap(fd, self.size)

    def close(self) -> None:
        # A numpy view may still point into it; then the mapping goes with the view.
        with contextlib.suppress(BufferError):
            self.mm.close()
        os.close(self.fd)


def grown(size_bytes: int) -> int:
    """Capacity for a slab that must hold `size_bytes`: room to grow into."""
    return max(1 << 16, 1 << (max(1, size_bytes) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lies in a slab. BYTES tensors lie in the KServe v2
    length-prefixed form (`serialized`); others as raw C-order elements."""

    name: str
    dtype: Any  # numpy dtype (object for BYTES)
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    serialized: bool = False


def aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def view(slab: mmap.mmap, slot: TensorSlot) -> Array:
    """The tensor in place (numeric), or decoded (BYTES). No copy for numeric."""
    if slot.serialized:
        count = math.prod(slot.shape)
        raw = memoryview(slab)[slot.offset : slot.offset + slot.nbytes]
        # As text: onnxruntime's string tensors hold str (inputs were checked
        # as UTF-8 when decoded from the wire; outputs come from onnxruntime).
        elements = _core.decode_bytes_tensor(raw, count, True)
        raw.release()
        out = np.empty(count, dtype=object)
        out[:] = elements
        return out.reshape(slot.shape)
    count = math.prod(slot.shape)
    return np.frombuffer(slab, dtype=slot.dtype, count=count, offset=slot.offset).reshape(
        slot.shape
    )


def write_arrays(
    slab: Slab | None, arrays: list[tuple[str, Array]], make: Any
) -> tuple[Slab, list[TensorSlot], bool]:
    """Writes whole arrays one after another into `slab`, replacing it with
    make(size) first when it is too small. Returns (slab, slots, replaced)."""
    encoded: list[tuple[str, Array, bytes | None]] = []
    total = 0
    for name, arr in arrays:
        blob = _core.encode_bytes_tensor(arr.ravel().tolist()) if arr.dtype == object else None
        size = len(blob) if blob is not None else arr.nbytes
        encoded.append((name, arr, blob))
        total = aligned(total) + size
    replaced = False
    if slab is None or slab.size < total:
        if slab is not None:
            slab.close()
        slab = make(grown(total))
        replaced = True
    assert slab is not None
    slots: list[TensorSlot] = []
    offset = 0
    for name, arr, blob in encoded:
        offset = aligned(offset)
        if blob is not None:
            slab.mm[offset : offset + len(blob)] = blob
            slots.append(TensorSlot(name, arr.dtype, tuple(arr.shape), offset, len(blob), True))
            offset += len(blob)
            continue
        dst = np.frombuffer(slab.mm, dtype=arr.dtype, count=arr.size, offset=offset)
        dst[...] = arr.reshape(-1)
        slots.append(TensorSlot(name, arr.dtype, tuple(arr.shape), offset, arr.nbytes))
        offset += arr.nbytes
    return slab, slots, replaced
