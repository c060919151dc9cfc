"""
Docker's multiplexed stream (non-TTY attach and logs), decoded incrementally and without I/O.

Each frame is an 8-byte header — the stream id (0 stdin, 1 stdout, 2 stderr), three zero bytes and
the payload length as a big-endian 32-bit number — followed by the payload::

    >>> d = Demultiplexer()
    >>> d.feed(encode_frame(STDOUT, b"hello ") + encode_frame(STDOUT, b"world")[:10])
    [(1, b'hello wo')]
    >>> d.feed(b"rld" + encode_frame(STDERR, b"oops"))
    [(1, b'rld'), (2, b'oops')]

Payload is handed on as soon as it arrives, never held back until its frame is complete, so output
flows with no added latency and memory stays bounded by the size of one read.
"""

from __future__ import annotations

import struct

__all__ = [
    "HEADER_SIZE",
    "STDERR",
    "STDIN",
    "STDOUT",
    "STREAM_NAMES",
    "Demultiplexer",
    "MuxProtocolError",
    "encode_frame",
]

STDIN = 0
STDOUT = 1
STDERR = 2
#: The name of each stream id, as the JSON output of a batch job spells it.
STREAM_NAMES = {STDIN: "stdin", STDOUT: "stdout", STDERR: "stderr"}
HEADER_SIZE = 8

# The header read as two big-endian words: the first holds the stream id in its top byte and the
# padding, which must be zero, in the three below it; the second is the payload length.
_HEADER = struct.Struct(">II")
_VALID_FIRST_WORDS = frozenset(stream << 24 for stream in STREAM_NAMES)
_MAX_PAYLOAD = 0xFFFFFFFF


class MuxProtocolError(ValueError):
    """
    The bytes are not a multiplexed stream: a frame header has an unknown stream id or nonzero
    padding.

    ``pieces`` holds the output decoded from the same ``feed`` call before the bad header, so
    nothing that arrived intact is lost.
    """

    def __init__(self, message: str, pieces: list[tuple[int, bytes]] | None = None) -> None:
        super().__init__(message)
        self.pieces: list[tuple[int, bytes]] = pieces if pieces is not None else []


def encode_frame(stream: int, payload: bytes) -> bytes:
    """Return one frame carrying ``payload`` on ``stream`` (0 stdin, 1 stdout, 2 stderr)."""
    if stream not in STREAM_NAMES:
        raise ValueError(f"unknown stream id {stream!r}: expected 0 (stdin), 1 (stdout) or 2 (stderr)")
    if len(payload) > _MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes does not fit in one frame")
    return _HEADER.pack(stream << 24, len(payload)) + bytes(payload)


def _describe_bad_header(header: bytes) -> str:
    """Name what is wrong with a frame header that failed the check."""
    stream = header[0]
    if stream not in STREAM_NAMES:
        problem = f"unknown stream id {stream}"
    else:
        problem = f"nonzero padding {header[1:4].hex()}"
    return f"not a multiplexed stream: {problem} in frame header {header.hex()}"


class Demultiplexer:
    """
    An incremental decoder of Docker's multiplexed stream.

    ``feed`` takes bytes as they come and returns ``(stream id, payload piece)`` pairs in the order
    they arrived; adjacent pieces of one stream within one call come out as one. Between calls it
    keeps at most a partial frame header (under 8 bytes), never payload.

    Once a bad header has been seen the stream cannot be resynchronised: that ``feed`` and every
    later one raise ``MuxProtocolError``.
    """

    __slots__ = ("_header", "_stream", "_remaining", "_error")

    def __init__(self) -> None:
        self._header = b""
        self._stream = STDOUT
        self._remaining = 0
        self._error: str | None = None

    @property
    def pending(self) -> int:
        """The number of bytes of a partial frame header held until the rest arrives."""
        return len(self._header)

    @property
    def remaining(self) -> int:
        """The number of payload bytes the current frame still has to deliver."""
        return self._remaining

    @property
    def at_boundary(self) -> bool:
        """True when between frames: no partial header held and no payload outstanding."""
        return not self._header and not self._remaining

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """
        Decode ``data``, the next bytes of the stream.

        :return: ``(stream id, bytes)`` pairs, possibly empty; pieces are never empty.
        :raises MuxProtocolError: at a header with an unknown stream id or nonzero padding (the
            exception's ``pieces`` hold what this call decoded before it).
        """
        if self._error is not None:
            raise MuxProtocolError(f"stream already failed: {self._error}")
        if type(data) is not bytes:
            data = bytes(data)
        out: list[tuple[int, bytes]] = []
        # The run of pieces of one stream being gathered, joined when another stream interrupts.
        run: list[bytes] = []
        run_stream = -1
        size = len(data)
        pos = 0
        stream = self._stream
        remaining = self._remaining
        while True:
            if remaining:
                if pos >= size:
                    break
                end = pos + remaining
                if end >= size:
                    piece = data[pos:] if pos else data
                    remaining = end - size
                    pos = size
                else:
                    piece = data[pos:end]
                    remaining = 0
                    pos = end
                if stream == run_stream:
                    run.append(piece)
                else:
                    if run:
                        out.append((run_stream, run[0] if len(run) == 1 else b"".join(run)))
                    run = [piece]
                    run_stream = stream
                continue
            # Between frames: read the next header.
            available = size - pos
            if self._header:
                need = HEADER_SIZE - len(self._header)
                if available < need:
                    self._header += data[pos:]
                    break
                header = self._header + data[pos : pos + need]
                self._header = b""
                pos += need
                first, remaining = _HEADER.unpack(header)
            elif available >= HEADER_SIZE:
                first, remaining = _HEADER.unpack_from(data, pos)
                header = b""
                pos += HEADER_SIZE
            else:
                if available:
                    self._header = data[pos:]
                break
            if first not in _VALID_FIRST_WORDS:
                if not header:
                    header = data[pos - HEADER_SIZE : pos]
                self._error = _describe_bad_header(header)
                self._remaining = 0
                self._header = b""
                if run:
                    out.append((run_stream, run[0] if len(run) == 1 else b"".join(run)))
                raise MuxProtocolError(self._error, out)
            stream = first >> 24
        if run:
            out.append((run_stream, run[0] if len(run) == 1 else b"".join(run)))
        self._stream = stream
        self._remaining = remaining
        return out
