"""
Tests for ``flynnsched.docker.mux``: the multiplexed-stream decoder at arbitrary byte splits.

Run as a script, ``PYTHONPATH=. .venv/bin/python tests/test_mux.py [MiB [read KiB]]`` measures the
decoder's throughput on 8–32 KiB frames delivered in 32 KiB reads, as the engine sends them.
"""

from __future__ import annotations

import random
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flynnsched.docker.mux import (
    HEADER_SIZE,
    STDERR,
    STDIN,
    STDOUT,
    Demultiplexer,
    MuxProtocolError,
    encode_frame,
)

from tests.conftest import split_at

frames_strategy = st.lists(
    st.tuples(st.sampled_from([STDIN, STDOUT, STDERR]), st.binary(max_size=64)), max_size=30
)


def merge_runs(pieces: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Join adjacent pieces of one stream and drop empty ones: the order-preserving essence."""
    merged: list[tuple[int, bytes]] = []
    for stream, payload in pieces:
        if not payload:
            continue
        if merged and merged[-1][0] == stream:
            merged[-1] = (stream, merged[-1][1] + payload)
        else:
            merged.append((stream, payload))
    return merged


def feed_all(demux: Demultiplexer, chunks: list[bytes]) -> list[list[tuple[int, bytes]]]:
    """Feed each chunk and return what each call returned."""
    return [demux.feed(chunk) for chunk in chunks]


@given(frames=frames_strategy, cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_arbitrary_splits_reassemble_in_order(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    """Split anywhere, the pieces reassemble into every stream's bytes in the order they were sent."""
    wire = b"".join(encode_frame(stream, payload) for stream, payload in frames)
    demux = Demultiplexer()
    outputs = feed_all(demux, split_at(wire, cuts))
    pieces = [piece for output in outputs for piece in output]
    assert merge_runs(pieces) == merge_runs(frames)
    for stream in (STDIN, STDOUT, STDERR):
        expected = b"".join(p for s, p in frames if s == stream)
        assert b"".join(p for s, p in pieces if s == stream) == expected
    assert all(payload for _, payload in pieces)
    assert demux.at_boundary
    assert demux.pending == 0


@given(frames=frames_strategy, cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_pieces_are_coalesced_within_one_call(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    """No call returns two adjacent pieces of the same stream."""
    wire = b"".join(encode_frame(stream, payload) for stream, payload in frames)
    for output in feed_all(Demultiplexer(), split_at(wire, cuts)):
        assert merge_runs(output) == output


@given(frames=frames_strategy, cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_payload_is_never_held_back(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    """After each call, everything that arrived except header bytes has been handed on."""
    wire = b"".join(encode_frame(stream, payload) for stream, payload in frames)
    demux = Demultiplexer()
    fed = 0
    delivered = 0
    for chunk in split_at(wire, cuts):
        delivered += sum(len(p) for _, p in demux.feed(chunk))
        fed += len(chunk)
        # Walk the frames to count the header bytes within the first ``fed`` bytes.
        header_bytes = 0
        offset = 0
        for _, payload in frames:
            if offset >= fed:
                break
            header_bytes += min(HEADER_SIZE, fed - offset)
            offset += HEADER_SIZE + len(payload)
        assert delivered == fed - header_bytes
        assert demux.pending == (header_bytes % HEADER_SIZE if not demux.remaining else 0)


def test_large_frame_streams_per_read() -> None:
    """A 1 MiB frame read 64 KiB at a time comes out as 16 pieces, each as its read arrives."""
    payload = bytes(range(256)) * 4096
    wire = encode_frame(STDOUT, payload)
    demux = Demultiplexer()
    assert demux.feed(wire[:HEADER_SIZE]) == []
    reads = [wire[i : i + 65536] for i in range(HEADER_SIZE, len(wire), 65536)]
    assert len(reads) == 16
    for number, read in enumerate(reads):
        assert demux.feed(read) == [(STDOUT, read)]
        assert demux.remaining == len(payload) - 65536 * (number + 1)
    assert demux.at_boundary


def test_partial_header_is_held() -> None:
    """Three bytes of a header give nothing yet and are reported as pending."""
    demux = Demultiplexer()
    frame = encode_frame(STDERR, b"boom")
    assert demux.feed(frame[:3]) == []
    assert demux.pending == 3
    assert not demux.at_boundary
    assert demux.feed(frame[3:7]) == []
    assert demux.pending == 7
    assert demux.feed(frame[7:9]) == [(STDERR, b"b")]
    assert demux.pending == 0
    assert demux.remaining == 3
    assert not demux.at_boundary
    assert demux.feed(frame[9:]) == [(STDERR, b"oom")]
    assert demux.at_boundary


def test_empty_frames_and_empty_feeds_give_nothing() -> None:
    """Zero-length frames and empty reads produce no pieces."""
    demux = Demultiplexer()
    assert demux.feed(b"") == []
    assert demux.feed(encode_frame(STDOUT, b"") * 3) == []
    assert demux.at_boundary


def test_stdout_and_stderr_interleave() -> None:
    """Alternating streams come out as separate pieces in arrival order."""
    wire = (
        encode_frame(STDOUT, b"a")
        + encode_frame(STDOUT, b"b")
        + encode_frame(STDERR, b"c")
        + encode_frame(STDOUT, b"d")
    )
    assert Demultiplexer().feed(wire) == [(STDOUT, b"ab"), (STDERR, b"c"), (STDOUT, b"d")]


def test_accepts_bytearray_and_memoryview() -> None:
    """Bytes-like input works and output is always bytes."""
    wire = encode_frame(STDOUT, b"xy")
    demux = Demultiplexer()
    first = demux.feed(bytearray(wire[:9]))  # type: ignore[arg-type]
    second = demux.feed(memoryview(wire[9:]))  # type: ignore[arg-type]
    assert first == [(STDOUT, b"x")] and second == [(STDOUT, b"y")]
    assert type(first[0][1]) is bytes and type(second[0][1]) is bytes


def test_unknown_stream_id_is_an_error() -> None:
    """A header with stream id 3 raises, names the id, and keeps the earlier output."""
    demux = Demultiplexer()
    wire = encode_frame(STDOUT, b"ok") + b"\x03\x00\x00\x00\x00\x00\x00\x01x"
    with pytest.raises(MuxProtocolError, match="unknown stream id 3") as caught:
        demux.feed(wire)
    assert isinstance(caught.value, ValueError)
    assert caught.value.pieces == [(STDOUT, b"ok")]
    assert "0300000000000001" in str(caught.value)


def test_nonzero_padding_is_an_error() -> None:
    """A header whose padding bytes are not zero raises and names the padding."""
    with pytest.raises(MuxProtocolError, match="nonzero padding 000100"):
        Demultiplexer().feed(b"\x01\x00\x01\x00\x00\x00\x00\x01x")


def test_bad_header_split_across_reads_is_an_error() -> None:
    """A bad header is caught even when it arrives in pieces."""
    demux = Demultiplexer()
    assert demux.feed(b"\x01\x00") == []
    with pytest.raises(MuxProtocolError, match="nonzero padding 000200"):
        demux.feed(b"\x02\x00\x00\x00\x05hello")


def test_failure_is_sticky() -> None:
    """After a protocol error every later feed fails too: the framing is lost."""
    demux = Demultiplexer()
    with pytest.raises(MuxProtocolError):
        demux.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(MuxProtocolError, match="already failed: .*unknown stream id 72"):
        demux.feed(encode_frame(STDOUT, b"fine"))


@given(
    frames=frames_strategy,
    bad=st.binary(min_size=8, max_size=8).filter(
        lambda h: h[0] > 2 or h[1:4] != b"\x00\x00\x00"
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_bad_header_at_any_split_keeps_prior_output(
    frames: list[tuple[int, bytes]], bad: bytes, cuts: list[int]
) -> None:
    """Whatever the split, everything before a bad header is delivered and then the error is raised."""
    wire = b"".join(encode_frame(stream, payload) for stream, payload in frames) + bad + b"tail"
    demux = Demultiplexer()
    pieces: list[tuple[int, bytes]] = []
    with pytest.raises(MuxProtocolError):
        for chunk in split_at(wire, cuts):
            try:
                pieces.extend(demux.feed(chunk))
            except MuxProtocolError as e:
                pieces.extend(e.pieces)
                raise
    assert merge_runs(pieces) == merge_runs(frames)


def test_encode_frame_layout() -> None:
    """A frame is stream id, three zero bytes, big-endian length, payload."""
    assert encode_frame(STDERR, b"hi") == b"\x02\x00\x00\x00\x00\x00\x00\x02hi"
    assert encode_frame(STDIN, b"") == b"\x00" * 8


def test_encode_frame_rejects_unknown_stream() -> None:
    """Only stream ids 0, 1 and 2 can be encoded."""
    with pytest.raises(ValueError, match="unknown stream id 3"):
        encode_frame(3, b"x")


def measure(total_mib: int = 256, chunk: int = 32 * 1024, seed: int = 1) -> float:
    """Feed ``total_mib`` MiB of 8–32 KiB frames in ``chunk``-byte reads; return payload MB/s."""
    rng = random.Random(seed)
    block = bytes(rng.getrandbits(8) for _ in range(32 * 1024))
    # One 8 MiB stretch of whole frames, read repeatedly: the decoder's state carries across.
    wire = bytearray()
    payload_bytes = 0
    while len(wire) < 8 * 1024 * 1024:
        size = rng.randint(8 * 1024, 32 * 1024)
        wire += encode_frame(rng.choice((STDOUT, STDOUT, STDOUT, STDERR)), block[:size])
        payload_bytes += size
    data = bytes(wire)
    reads = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    rounds = -(-total_mib * 1024 * 1024 // len(data))
    demux = Demultiplexer()
    delivered = 0
    start = time.perf_counter()
    for _ in range(rounds):
        for read in reads:
            for _stream, piece in demux.feed(read):
                delivered += len(piece)
    elapsed = time.perf_counter() - start
    assert delivered == payload_bytes * rounds and demux.at_boundary
    print(
        f"{rounds * len(data) / 2**20:.0f} MiB in {chunk // 1024} KiB reads: "
        f"{elapsed:.3f} s, {delivered / elapsed / 1e6:.0f} MB/s of payload"
    )
    return delivered / elapsed / 1e6


if __name__ == "__main__":
    measure(
        int(sys.argv[1]) if len(sys.argv) > 1 else 256,
        int(sys.argv[2]) * 1024 if len(sys.argv) > 2 else 32 * 1024,
    )
