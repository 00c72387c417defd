"""Messages between the pool and its workers: pickle protocol 5 with numpy arrays as raw out-of-band frames.

A message is one frame holding the pickle stream and the sizes of its buffers, then one frame per
buffer. Contiguous numpy arrays never enter the pickle stream (no copy into it, no nested lists):
their memory is written to the pipe as it is and read back into a writable buffer of the right size.
Both ends are our own processes over a private pipe, so unpickling is trusted.
"""

from __future__ import annotations

import pickle
import struct
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["Frames", "encode", "receive", "send"]

Frames = list[memoryview]

_COUNT = struct.Struct("<I")


def encode(message: Any) -> Frames:
    """Serialize ``message`` now (errors surface to the caller) into frames for ``send``."""
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
    return [memoryview(_COUNT.pack(len(raws)) + sizes + stream), *raws]


def send(conn: Connection, frames: Frames) -> None:
    """Write one encoded message (blocks until the pipe takes it)."""
    for frame in frames:
        conn.send_bytes(frame)


def receive(conn: Connection) -> Any:
    """Read one message; raises EOFError when the other end has closed (or died)."""
    head = conn.recv_bytes()
    (count,) = _COUNT.unpack_from(head)
    sizes = struct.unpack_from(f"<{count}Q", head, _COUNT.size)
    stream = memoryview(head)[_COUNT.size + 8 * count :]
    buffers = []
    for size in sizes:
        # A bytearray, not bytes: arrays rebuilt on it are writable, as the sender's were.
        buffer = bytearray(size)
        if size:
            conn.recv_bytes_into(buffer)
        else:
            conn.recv_bytes()
        buffers.append(buffer)
    return pickle.loads(stream, buffers=buffers)  # noqa: S301 - our own processes, private pipe
