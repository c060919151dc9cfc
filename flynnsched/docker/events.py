"""
Docker's event stream (``GET /events``), decoded incrementally and without I/O.

The engine sends one JSON record a line, in chunks that ignore line boundaries: a line, or even one
UTF-8 character, may be cut anywhere. ``EventLineParser`` reassembles lines and turns each record
into an ``interface.Event``; ``event_from_record`` does the conversion alone.

Malformed lines never stop the stream: the parser always consumes the whole chunk and stays usable
for the lines after a bad one. What happens to the bad line is the caller's choice:

- by default ``feed`` raises ``EventParseError`` once it has consumed the chunk; the error names
  every problem and carries the chunk's good events in ``events``, so none are lost;
- with ``on_error``, each bad line is reported to that callable and skipped, and ``feed`` never
  raises.
"""

from __future__ import annotations

import json
from typing import Callable, Mapping

from flynnsched.docker.interface import Event

__all__ = ["MAX_LINE", "EventLineParser", "EventParseError", "event_from_record"]

#: The longest event line accepted, in bytes (without its newline). Longer lines are errors and
#: are skipped without being held in memory.
MAX_LINE = 1024 * 1024

_EXCERPT = 80


class EventParseError(ValueError):
    """
    One or more event lines could not be read.

    ``problems`` lists each one (the first is the exception's message when there is only one);
    ``events`` holds the good events decoded in the same ``feed`` call, in order.
    """

    def __init__(
        self, message: str, events: list[Event] | None = None, problems: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.events: list[Event] = events if events is not None else []
        self.problems: list[str] = problems if problems is not None else [message]


def _excerpt(line: bytes) -> str:
    """The start of a line, printable, for error messages."""
    if len(line) <= _EXCERPT:
        return repr(line)
    return repr(line[:_EXCERPT]) + f"… ({len(line)} bytes)"


def _string(record: Mapping[str, object], key: str, where: str = "") -> str | None:
    """``record[key]`` when it is a string, None when absent or null; any other type is an error."""
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    raise EventParseError(f"event field {where}{key} is not a string: {value!r}")


def event_from_record(record: Mapping[str, object]) -> Event:
    """
    Convert one decoded event record to an ``Event``.

    Current fields (``Type``, ``Action``, ``Actor.ID``, ``Actor.Attributes``, ``timeNano``) come
    first; each missing one falls back on the old-style record (``status``, ``id``, ``from``,
    ``time``). An old-style record has no type: it is a container event when it names the image the
    container came ``from`` and an image event otherwise, as in the engine's API before 1.22.

    :raises EventParseError: naming the field that is missing or of the wrong type.
    """
    actor = record.get("Actor")
    if actor is None:
        actor = {}
    elif not isinstance(actor, dict):
        raise EventParseError(f"event field Actor is not an object: {actor!r}")

    image = _string(record, "from")
    type_ = _string(record, "Type")
    if type_ is None:
        type_ = "container" if image is not None else "image"

    action = _string(record, "Action")
    if action is None:
        action = _string(record, "status")
    if not action:
        raise EventParseError("event has neither Action nor status")

    id_ = _string(actor, "ID", "Actor.")
    if id_ is None:
        id_ = _string(record, "id")
    if id_ is None:
        raise EventParseError("event has neither Actor.ID nor id")

    raw_attributes = actor.get("Attributes")
    attributes: dict[str, str] = {}
    if raw_attributes is None:
        if image is not None:
            attributes["image"] = image
    elif isinstance(raw_attributes, dict):
        for key, value in raw_attributes.items():
            if not isinstance(value, str):
                raise EventParseError(f"event attribute {key!r} is not a string: {value!r}")
            attributes[key] = value
    else:
        raise EventParseError(f"event field Actor.Attributes is not an object: {raw_attributes!r}")

    time_nano = record.get("timeNano")
    if time_nano is None:
        seconds = record.get("time")
        if seconds is None:
            raise EventParseError("event has neither timeNano nor time")
        if type(seconds) is not int:
            raise EventParseError(f"event field time is not an integer: {seconds!r}")
        time_nano = seconds * 1_000_000_000
    elif type(time_nano) is not int:
        raise EventParseError(f"event field timeNano is not an integer: {time_nano!r}")

    return Event(type=type_, action=action, id=id_, attributes=attributes, time_nano=time_nano)


def _event_from_line(line: bytes) -> Event:
    """Decode one complete line (without its newline)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EventParseError(
            f"event line is not UTF-8 (at byte {e.start}): {_excerpt(line)}"
        ) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise EventParseError(
            f"event line is not JSON ({e.msg} at column {e.colno}): {_excerpt(line)}"
        ) from None
    if not isinstance(record, dict):
        raise EventParseError(f"event line is not a JSON object: {_excerpt(line)}")
    return event_from_record(record)


class EventLineParser:
    """
    An incremental decoder of the engine's newline-delimited JSON event stream.

    Blank lines are ignored, and so is whitespace around a record (a carriage return before the
    newline, say).

    :param on_error: when given, called with an ``EventParseError`` for each bad line, which is
        skipped; ``feed`` then never raises. When not, ``feed`` raises (see the module docstring).
    :param max_line: the longest line accepted, in bytes; the default is ``MAX_LINE``.
    """

    def __init__(
        self,
        on_error: Callable[[EventParseError], None] | None = None,
        max_line: int = MAX_LINE,
    ) -> None:
        self._on_error = on_error
        self._max_line = max_line
        self._partial = bytearray()
        # True while dropping the rest of a line already reported as too long.
        self._skipping = False

    @property
    def pending(self) -> int:
        """The number of bytes of an unfinished line held until its newline arrives."""
        return len(self._partial)

    @property
    def at_boundary(self) -> bool:
        """True when between lines: nothing of an unfinished line is held or being skipped."""
        return not self._partial and not self._skipping

    def feed(self, data: bytes) -> list[Event]:
        """
        Decode ``data``, the next bytes of the stream.

        :return: the events of the lines completed by ``data``, in order.
        :raises EventParseError: when a line completed by ``data`` is malformed or too long, and no
            ``on_error`` was given; the whole chunk has been consumed all the same.
        """
        events: list[Event] = []
        problems: list[EventParseError] = []
        start = 0
        size = len(data)
        while start < size:
            newline = data.find(b"\n", start)
            if self._skipping:
                if newline < 0:
                    break
                self._skipping = False
                start = newline + 1
                continue
            if newline < 0:
                held = len(self._partial) + size - start
                if held > self._max_line:
                    problems.append(self._too_long(held))
                    self._partial.clear()
                    self._skipping = True
                else:
                    self._partial += data[start:]
                break
            if self._partial:
                length = len(self._partial) + newline - start
                if length <= self._max_line:
                    self._partial += data[start:newline]
                    line = bytes(self._partial)
                self._partial.clear()
            else:
                length = newline - start
                line = data[start:newline]
            start = newline + 1
            if length > self._max_line:
                problems.append(self._too_long(length))
                continue
            if not line.strip():
                continue
            try:
                events.append(_event_from_line(line))
            except EventParseError as e:
                problems.append(e)
        if problems:
            if self._on_error is not None:
                for problem in problems:
                    self._on_error(problem)
            else:
                messages = [str(p) for p in problems]
                message = messages[0] if len(messages) == 1 else (
                    f"{len(messages)} malformed event lines: " + "; ".join(messages)
                )
                raise EventParseError(message, events, messages)
        return events

    def _too_long(self, length: int) -> EventParseError:
        """The error for a line of at least ``length`` bytes, over the limit."""
        return EventParseError(
            f"event line longer than {self._max_line} bytes (at least {length}): skipped"
        )
