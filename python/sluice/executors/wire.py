"""What the server and its executor processes say to each other.

One AF_UNIX SOCK_SEQPACKET socket per instance: each message is one packet
(no framing to parse), and file descriptors of shared-memory slabs travel with
it (SCM_RIGHTS). Both ends are this package and the same interpreter, so
messages are tuples: the per-batch ones ("run", "done", "error") hold only
str/int/bool/tuples and go through marshal, several times cheaper than pickle
on both ends of every batch; the rest (the launch spec) are pickled. A first
byte says which. Tensor data never travels on the socket: it sits in memfd
slabs that both processes map, and the messages carry only where each tensor
lies.

Slabs are anonymous memfds: nothing to name, unlink or leak; the memory goes
away when the last process holding it closes it or dies.
"""

from __future__ import annotations

import array
import contextlib
import marshal
import math
import mmap
import os
import pickle
import socket
from typing import Any, NamedTuple

import numpy as np

from sluice import _core, datatypes

Array = np.ndarray[Any, Any]

MAX_MESSAGE_BYTES = 1 << 20  # descriptors only; far below the socket's limit
ALIGN = 64  # each tensor starts on a cache line


_MARSHAL = b"M"
_PICKLE = b"P"


def send(sock: socket.socket, message: tuple[Any, ...], fds: list[int] | None = None) -> None:
    """Sends one message; one that holds only marshal's types goes through
    marshal (batches), anything else through pickle (control)."""
    try:
        data = _MARSHAL + marshal.dumps(message)
    except ValueError:  # an object marshal does not know (the launch spec)
        data = _PICKLE + pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


_FD_BYTES = array.array("i").itemsize
_MAX_FDS = 4


class Receiver:
    """Receives one socket's messages into one reusable buffer: an anonymous
    mapping, so its pages are only touched as far as messages reach, and no
    message allocates (and the allocator maps and unmaps) a fresh 1 MiB.
    One per socket and thread: the buffer holds the last message until the next."""

    def __init__(self) -> None:
        self._buffer = mmap.mmap(-1, MAX_MESSAGE_BYTES)

    def __call__(self, sock: socket.socket) -> tuple[tuple[Any, ...] | None, list[int]]:
        """As `receive`."""
        nbytes, ancdata, flags, _ = sock.recvmsg_into(
            [self._buffer], socket.CMSG_SPACE(_MAX_FDS * _FD_BYTES)
        )
        fds = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % _FD_BYTES)])
        with memoryview(self._buffer) as view:
            return _decode(view[:nbytes], flags, list(fds))


def receive(sock: socket.socket) -> tuple[tuple[Any, ...] | None, list[int]]:
    """One message and the descriptors that came with it; (None, []) at EOF.
    Raises BlockingIOError on a non-blocking socket with nothing to read."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES, _MAX_FDS)
    return _decode(memoryview(data), flags, list(fds))


def _decode(
    data: memoryview, flags: int, fds: list[int]
) -> tuple[tuple[Any, ...] | None, list[int]]:
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ValueError("executor message truncated")
    kind, body = data[:1], data[1:]
    if kind == _MARSHAL:
        message = marshal.loads(body)
    elif kind == _PICKLE:
        message = pickle.loads(body)
    else:
        for fd in fds:
            os.close(fd)
        raise ValueError("executor message of an unknown kind")
    return message, fds


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


class TensorSlot(NamedTuple):
    """Where one tensor lies in a slab. BYTES tensors lie in the KServe v2
    length-prefixed form (`serialized`); others as raw C-order elements.
    Travels as a plain tuple (`wire_slots` / `from_wire`)."""

    name: str
    dtype: str  # KServe v2 datatype ("FP32", "BF16", "BYTES"): see dtype_code
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    serialized: bool = False


# numpy dtypes by KServe v2 name: every dtype a tensor can have here
# (dtype.str would not do: bfloat16's is an anonymous "<V2").
_NUMPY = {d.wire: d.numpy for d in datatypes.ALL if d.numpy is not None}


def dtype_code(dtype: np.dtype[Any]) -> str:
    return datatypes.from_numpy(dtype).wire


def wire_slots(slots: list[TensorSlot]) -> tuple[tuple[Any, ...], ...]:
    """Slots as plain tuples, which marshal takes (it refuses tuple subclasses)."""
    return tuple(tuple(s) for s in slots)


def from_wire(slots: tuple[tuple[Any, ...], ...]) -> list[TensorSlot]:
    return [TensorSlot(*s) for s in slots]


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
    return np.frombuffer(slab, dtype=_NUMPY[slot.dtype], count=count, offset=slot.offset).reshape(
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
            slots.append(
                TensorSlot(name, dtype_code(arr.dtype), tuple(arr.shape), offset, len(blob), True)
            )
            offset += len(blob)
            continue
        dst = np.frombuffer(slab.mm, dtype=arr.dtype, count=arr.size, offset=offset)
        dst[...] = arr.reshape(-1)
        slots.append(TensorSlot(name, dtype_code(arr.dtype), tuple(arr.shape), offset, arr.nbytes))
        offset += arr.nbytes
    return slab, slots, replaced
