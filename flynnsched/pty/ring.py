"""
A bounded history of a terminal's output, addressed by absolute byte offsets.

Every byte a PTY program writes gets an offset: the first byte is 0 and offsets never repeat. The
buffer keeps only the newest ``capacity`` bytes, so a client that reconnects can ask for everything
after the last offset it saw and get exactly the bytes it missed, or, if those have been dropped,
learn where the kept history now starts.
"""

from __future__ import annotations

from collections import deque

#: Appends smaller than this are merged into the previous chunk, so many tiny writes (typed
#: echo) don't cost one object each.
_COALESCE = 4096


class RingBuffer:
    """The newest ``capacity`` bytes of a stream, with the absolute offsets of what it holds."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a ring buffer holds at least one byte")
        self.capacity = capacity
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._end = 0

    @property
    def start(self) -> int:
        """The offset of the oldest byte held."""
        return self._end - self._size

    @property
    def end(self) -> int:
        """The offset just after the newest byte: the total number of bytes ever appended."""
        return self._end

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        """Add ``data`` at the end, dropping the oldest bytes beyond ``capacity``."""
        if not data:
            return
        self._end += len(data)
        if len(data) >= self.capacity:
            self._chunks.clear()
            self._chunks.append(bytes(data[-self.capacity :]))
            self._size = self.capacity
            return
        if self._chunks and len(self._chunks[-1]) < _COALESCE and len(data) < _COALESCE:
            self._chunks[-1] += data
        else:
            self._chunks.append(bytes(data))
        self._size += len(data)
        excess = self._size - self.capacity
        while excess > 0:
            head = self._chunks[0]
            if len(head) <= excess:
                self._chunks.popleft()
                self._size -= len(head)
                excess -= len(head)
            else:
                self._chunks[0] = head[excess:]
                self._size -= excess
                excess = 0

    def read_from(self, offset: int) -> tuple[int, bytes]:
        """
        The bytes from ``offset`` on, and the offset they really start at.

        An offset older than the history starts at ``start``; one at or past ``end`` gives no
        bytes (starting at ``end``).
        """
        if offset >= self._end:
            return self._end, b""
        begin = max(offset, self.start)
        skip = begin - self.start
        data = b"".join(self._chunks)[skip:]
        return begin, data


def skip_partial_utf8(data: bytes) -> int:
    """
    How many leading bytes of ``data`` are UTF-8 continuation bytes (at most 3): the tail of a
    character whose start was cut off, which a replay should not begin with.
    """
    n = 0
    while n < min(3, len(data)) and 0x80 <= data[n] <= 0xBF:
        n += 1
    return n
