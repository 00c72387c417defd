"""The parent's end of a worker pipe parses Connection frames however the bytes are split."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.workers import transport
from service.workers.pool import _Pipe


class Collector:
    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.closed = 0
        self.garbage = 0

    def pipe(self) -> _Pipe:
        return _Pipe(self.messages.append, self._closed, self._garbage)

    def _closed(self) -> None:
        self.closed += 1

    def _garbage(self) -> None:
        self.garbage += 1


def wire(message: Any) -> bytes:
    """What the child's Connection.send_bytes writes for one message."""
    return b"".join(transport.frame_header(f.nbytes) + bytes(f) for f in transport.encode(message))


MESSAGES = [
    ("ready", 1234),
    ("result", 1, {"x": np.arange(7, dtype=np.float32)}, 512.0),
    ("result", 2, [np.arange(3 * transport.INLINE_MAX_BYTES, dtype=np.float64), np.zeros(0)], None),
    ("error", 3, {"code": "shape_error", "detail": "no"}, 100.0),
]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10**7), max_size=12))
def test_messages_split_anywhere_arrive_whole_and_in_order(cuts: list[int]) -> None:
    stream = b"".join(wire(m) for m in MESSAGES)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    collector = Collector()
    pipe = collector.pipe()
    for a, b in zip(points, points[1:], strict=False):
        pipe.data_received(stream[a:b])
    assert len(collector.messages) == len(MESSAGES) and collector.garbage == 0
    assert collector.messages[0] == ("ready", 1234)
    np.testing.assert_array_equal(collector.messages[1][2]["x"], MESSAGES[1][2]["x"])  # type: ignore[index]
    big = collector.messages[2][2][0]
    np.testing.assert_array_equal(big, MESSAGES[2][2][0])  # type: ignore[index]
    assert big.flags.writeable and collector.messages[2][2][1].shape == (0,)
    assert collector.messages[3] == MESSAGES[3]


def test_unreadable_bytes_are_reported_once_and_the_rest_ignored() -> None:
    collector = Collector()
    pipe = collector.pipe()
    pipe.data_received(wire(("ready", 1)))
    pipe.data_received(transport.frame_header(5) + b"\x00\x01junk")  # not a message head
    pipe.data_received(wire(("result", 2, None, None)))
    assert collector.messages == [("ready", 1)] and collector.garbage == 1


def test_the_end_of_the_pipe_is_reported_once() -> None:
    collector = Collector()
    pipe = collector.pipe()
    pipe.connection_lost(None)
    pipe.connection_lost(None)
    assert collector.closed == 1
    pipe.write(transport.encode(("job", 1, None)))  # after the end: dropped, not raised


def test_frame_headers_match_multiprocessing() -> None:
    assert transport.frame_header(10) == (10).to_bytes(4, "big")
    assert transport.frame_header(2**31) == (-1).to_bytes(4, "big", signed=True) + (2**31).to_bytes(8, "big")


def test_a_worker_talks_to_the_pool_over_two_one_way_pipes_not_a_socket(make_pool: Any, drive: Any) -> None:
    # With a socket pair, each reply the parent reads would wake the child, blocked reading its next job.
    pid = drive(make_pool().run({"op": "pid"}))
    targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert not [t for t in targets if t.startswith("socket:")], targets
    pipes = [t for t in targets if t.startswith("pipe:")]
    assert len(pipes) >= 2, targets
