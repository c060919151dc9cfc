"""
Tests for ``flynnsched.command``: a job's command from its URL's query string.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from flynnsched.command import InvalidCommand, parse_command, split_request_uri


def encode(argv: list[str]) -> bytes:
    """Encode an argument list as a client does: each argument quoted, joined by '+'."""
    return "+".join(quote(argument, safe="") for argument in argv).encode("ascii")


# Arguments are any text without NUL (which no program can receive) and without lone surrogates
# (which are not text UTF-8 can carry).
arguments = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=20)


@given(argv=st.lists(arguments, min_size=1, max_size=8))
def test_round_trip(argv: list[str]) -> None:
    """Any argument list encoded with quote(safe='') and '+' parses back unchanged."""
    assume(argv != [""])
    assert parse_command(encode(argv)) == tuple(argv)


@given(argv=st.lists(arguments, min_size=1, max_size=8))
def test_raw_utf8_and_lax_quoting_are_read_too(argv: list[str]) -> None:
    """Arguments sent as raw UTF-8, with only '%' and '+' escaped, are understood the same way."""
    assume(argv != [""])
    raw = "+".join(a.replace("%", "%25").replace("+", "%2B") for a in argv).encode("utf-8")
    assert parse_command(raw) == tuple(argv)


@pytest.mark.parametrize(
    "query, argv",
    [
        (b"sh+-c+echo%20hi", ("sh", "-c", "echo hi")),
        (b"5000", ("5000",)),
        (b"vi", ("vi",)),
        (b"expr+1+%2B+2", ("expr", "1", "+", "2")),
        (b"echo+100%25", ("echo", "100%")),
        (b"echo+a=b&c=d", ("echo", "a=b&c=d")),
        (b"echo+%E2%98%83", ("echo", "\u2603")),
        (b"echo+\xe2\x98\x83", ("echo", "\u2603")),
        (b"printf+%25s%5Cn+x", ("printf", "%s\\n", "x")),
        (b"a++b", ("a", "", "b")),
        (b"sh+-c+", ("sh", "-c", "")),
        (b"%2B", ("+",)),
        (b"%2b", ("+",)),
    ],
)
def test_examples(query: bytes, argv: tuple[str, ...]) -> None:
    """Each query splits on '+' and percent-decodes each part, never turning '+' into a space."""
    assert parse_command(query) == argv


@pytest.mark.parametrize("query", [None, b""])
def test_no_query_means_image_cmd(query: bytes | None) -> None:
    """No query, or an empty one, keeps the image's own CMD."""
    assert parse_command(query) is None


@pytest.mark.parametrize(
    "query, problem",
    [
        (b"echo+%ff", "argument 2 '%ff' is not valid UTF-8"),
        (b"echo+\xff", "argument 2 '\\\\xff' is not valid UTF-8"),
        (b"echo+%C3", "argument 2 '%C3' is not valid UTF-8"),
        (b"echo+a%00b", "argument 2 'a%00b' contains a NUL byte"),
        (b"a%00", "argument 1 'a%00' contains a NUL byte"),
        (b"printf+%s", "argument 2 '%s' has a '%' that does not start a percent-escape"),
        (b"echo+100%", "argument 2 '100%'"),
        (b"echo+%2", "write a literal '%' as %25"),
    ],
)
def test_invalid(query: bytes, problem: str) -> None:
    """Undecodable, NUL-carrying or badly escaped arguments raise InvalidCommand naming the argument."""
    with pytest.raises(InvalidCommand) as caught:
        parse_command(query)
    assert isinstance(caught.value, ValueError)
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    "uri, parts",
    [
        (b"/batch/flynn/busybox?sh+-c+echo%20hi", (b"/batch/flynn/busybox", b"sh+-c+echo%20hi")),
        (b"/batch/flynn/busybox", (b"/batch/flynn/busybox", None)),
        (b"/batch/flynn/busybox?", (b"/batch/flynn/busybox", b"")),
        (b"/pty/x?a?b", (b"/pty/x", b"a?b")),
        (b"/batch/localhost:5000/app:1?ls", (b"/batch/localhost:5000/app:1", b"ls")),
    ],
)
def test_split_request_uri(uri: bytes, parts: tuple[bytes, bytes | None]) -> None:
    """The URI splits at its first '?' with nothing decoded; no '?' means no query."""
    assert split_request_uri(uri) == parts


@given(argv=st.lists(arguments, min_size=1, max_size=5))
def test_split_then_parse(argv: list[str]) -> None:
    """A request URI built from an argument list gives the list back through both helpers."""
    assume(argv != [""])
    path, query = split_request_uri(b"/batch/flynn/busybox?" + encode(argv))
    assert path == b"/batch/flynn/busybox"
    assert parse_command(query) == tuple(argv)
