"""Messages between the pool and its workers: pickle protocol 5 with numpy arrays as raw out-of-band frames.

A small message is one frame: a header with the sizes of its buffers, the buffers, then the pickle
stream (one write and one read per message: the hot path of a warm request). A large one is a header
frame with the pickle stream, then one frame per buffer, so big numpy arrays are never copied into
the stream: their memory is written to the pipe as it is and read back into a writable buffer.
Both ends are our own processes over a private pipe, so unpickling is trusted.
"""

from __future__ import annotations

import pickle
import struct
from multiprocessing.connection import Connection
from typing import Any

__all__ = [
    "Decoder",
    "Frames",
    "decode",
    "encode",
    "frame_header",
    "is_inline",
    "is_single_frame",
    "receive",
    "send",
]

Frames = list[memoryview]

_HEAD = struct.Struct("<IB")  # number of buffers, whether they travel inline
# multiprocessing.Connection's frame prefix: a signed big-endian length, or -1 and a 64-bit length.
_SMALL = struct.Struct("!i")
_BIG = struct.Struct("!iQ")
# Inline up to this many buffer bytes: copying this much (~10 us) costs less than the two system
# calls per extra frame the child needs to read them (a train step's weights and batch fit).
INLINE_MAX_BYTES = 128 * 1024


def encode(message: Any) -> Frames:
    """Serialize ``message`` now (errors surface to the caller) into frames for ``send``."""
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
    if sum(r.nbytes for r in raws) + len(stream) <= INLINE_MAX_BYTES:
        return [memoryview(b"".join([_HEAD.pack(len(raws), 1), sizes, *raws, stream]))]
    return [memoryview(_HEAD.pack(len(raws), 0) + sizes + stream), *raws]


def is_single_frame(frames: Frames) -> bool:
    return len(frames) == 1 and frames[0].nbytes <= INLINE_MAX_BYTES + 4096


def send(conn: Connection, frames: Frames) -> None:
    """Write one encoded message (blocks until the pipe takes it)."""
    for frame in frames:
        conn.send_bytes(frame)


def receive(conn: Connection) -> Any:
    """Read one message; raises EOFError when the other end has closed (or died)."""
    return decode(conn.recv_bytes(), conn)


def is_inline(head: bytes) -> bool:
    """Whether a message's first frame is the whole message."""
    return bool(_HEAD.unpack_from(head)[1])


def frame_header(size: int) -> bytes:
    """The length prefix ``Connection.send_bytes`` puts before a frame (the child reads with it)."""
    if size > 0x7FFFFFFF:
        return _BIG.pack(-1, size)
    return _SMALL.pack(size)


class Decoder:
    """Rebuilds messages from frames as an event loop receives them (the parent's side of the pipe).

    ``feed`` takes one frame (its length prefix removed) and returns the finished message, or
    ``INCOMPLETE`` while a large message's buffers are still to come. Frames must be writable
    (bytearray): arrays rebuilt on them are writable, as the sender's were.
    """

    INCOMPLETE: Any = object()

    def __init__(self) -> None:
        self._head: bytearray | None = None
        self._sizes: tuple[int, ...] = ()
        self._buffers: list[bytearray] = []

    def feed(self, frame: bytearray) -> Any:
        if self._head is None:
            count, inline = _HEAD.unpack_from(frame)
            if inline or count == 0:
                return decode(frame, None)
            self._head = frame
            self._sizes = struct.unpack_from(f"<{count}Q", frame, _HEAD.size)
            self._buffers = []
            return self.INCOMPLETE
        if len(frame) != self._sizes[len(self._buffers)]:
            raise ValueError("a buffer frame does not have the announced size")
        self._buffers.append(frame)
        if len(self._buffers) < len(self._sizes):
            return self.INCOMPLETE
        head, buffers = self._head, self._buffers
        self._head, self._sizes, self._buffers = None, (), []
        stream = memoryview(head)[_HEAD.size + 8 * len(buffers) :]
        return pickle.loads(stream, buffers=buffers)  # noqa: S301 - our own processes, private pipe


def decode(head: bytes | bytearray, conn: Connection | None) -> Any:
    """The message whose first frame is ``head``, reading any further frames from ``conn``."""
    count, inline = _HEAD.unpack_from(head)
    sizes = struct.unpack_from(f"<{count}Q", head, _HEAD.size)
    offset = _HEAD.size + 8 * count
    view = memoryview(head)
    buffers = []
    for size in sizes:
        # A bytearray, not bytes: arrays rebuilt on it are writable, as the sender's were.
        buffer = bytearray(size)
        if inline:
            buffer[:] = view[offset : offset + size]
            offset += size
        elif conn is None:
            raise ValueError("a message with out-of-band buffers needs the connection to read them from")
        elif size:
            conn.recv_bytes_into(buffer)
        else:
            conn.recv_bytes()
        buffers.append(buffer)
    return pickle.loads(view[offset:], buffers=buffers)  # noqa: S301 - our own processes, private pipe
