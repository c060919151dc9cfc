"""
The command of a batch or PTY job, read from its URL's query string.

``GET /batch/flynn/busybox?sh+-c+echo%20hi`` runs ``["sh", "-c", "echo hi"]``: the raw query is
split on ``+`` and each part percent-decoded, so a literal ``+`` is written ``%2B`` and a literal
``%`` is ``%25``. No query, or an empty one, means the image's own CMD.

This is not HTML form decoding (where ``+`` is a space, which would make ``+`` mean two different
things), so the query must be taken from the raw request URI: ``split_request_uri`` does that.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

__all__ = ["InvalidCommand", "parse_command", "split_request_uri"]

# A '%' not followed by two hex digits.
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


class InvalidCommand(ValueError):
    """The query string is not a command; the message names the argument and the problem."""


def split_request_uri(uri: bytes) -> tuple[bytes, bytes | None]:
    """
    Split a raw request URI into its path and its query (None when there is no ``?``), with no
    decoding at all.
    """
    path, question, query = uri.partition(b"?")
    return path, (query if question else None)


def _show(part: bytes) -> str:
    """An argument as it was written in the URL, printable."""
    return repr(part.decode("ascii", "backslashreplace"))


def parse_command(raw_query: bytes | None) -> tuple[str, ...] | None:
    """
    Read a job's command from the raw query string.

    Empty arguments are kept (``a++b`` is ``("a", "", "b")``), so an argument list survives the
    trip through a URL unless it is empty or a single empty string.

    :return: the arguments, or None for the image's own CMD when the query is absent or empty.
    :raises InvalidCommand: when an argument has a malformed percent-escape, is not UTF-8 once
        decoded, or contains a NUL byte (which no program can receive).
    """
    if not raw_query:
        return None
    arguments = []
    for number, part in enumerate(raw_query.split(b"+"), 1):
        if _BAD_ESCAPE.search(part):
            raise InvalidCommand(
                f"argument {number} {_show(part)} has a '%' that does not start a percent-escape "
                "(write a literal '%' as %25)"
            )
        decoded = unquote_to_bytes(part)
        if b"\0" in decoded:
            raise InvalidCommand(f"argument {number} {_show(part)} contains a NUL byte")
        try:
            arguments.append(decoded.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidCommand(
                f"argument {number} {_show(part)} is not valid UTF-8 once percent-decoded"
            ) from None
    return tuple(arguments)
