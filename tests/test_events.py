"""
Tests for ``flynnsched.docker.events``: the event-stream decoder at arbitrary byte splits.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flynnsched.docker.events import MAX_LINE, EventLineParser, EventParseError, event_from_record
from flynnsched.docker.interface import Event

from tests.conftest import split_at

# Two lines as the engine (20.10, API 1.41) sent them here, ids shortened.
DIE_LINE = (
    b'{"status":"die","id":"439f39ecc7ad","from":"flynn/primesum","Type":"container",'
    b'"Action":"die","Actor":{"ID":"439f39ecc7ad","Attributes":{"exitCode":"0",'
    b'"image":"flynn/primesum","io.flynnsched.managed":"1","name":"zen_almeida"}},'
    b'"scope":"local","time":1796414801,"timeNano":1796414801400497802}\n'
)
NETWORK_LINE = (
    b'{"Type":"network","Action":"disconnect","Actor":{"ID":"2de8ab3afb3e","Attributes":'
    b'{"container":"439f39ecc7ad","name":"none","type":"null"}},"scope":"local",'
    b'"time":1796414801,"timeNano":1796414801402218802}\n'
)

text = st.text(max_size=12)
events_strategy = st.builds(
    Event,
    type=st.sampled_from(["container", "image", "network", "vølume"]),
    action=st.text(min_size=1, max_size=12),
    id=text,
    attributes=st.dictionaries(text, text, max_size=4),
    time_nano=st.integers(min_value=0, max_value=2**64),
)


def to_line(event: Event) -> bytes:
    """Encode an event as the engine does, non-ASCII characters as raw UTF-8."""
    record = {
        "Type": event.type,
        "Action": event.action,
        "Actor": {"ID": event.id, "Attributes": dict(event.attributes)},
        "scope": "local",
        "time": event.time_nano // 10**9,
        "timeNano": event.time_nano,
    }
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


@given(events=st.lists(events_strategy, max_size=10), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_arbitrary_splits_give_the_events_in_order(events: list[Event], cuts: list[int]) -> None:
    """However the stream is cut, even inside a UTF-8 character, the same events come out in order."""
    parser = EventLineParser()
    stream = b"".join(to_line(e) for e in events)
    got = [event for chunk in split_at(stream, cuts) for event in parser.feed(chunk)]
    assert got == events
    assert parser.at_boundary and parser.pending == 0


def test_engine_lines_byte_by_byte() -> None:
    """Real engine lines fed one byte at a time decode to their events."""
    parser = EventLineParser()
    got = []
    for i in range(len(DIE_LINE + NETWORK_LINE)):
        got.extend(parser.feed((DIE_LINE + NETWORK_LINE)[i : i + 1]))
    assert got == [
        Event(
            type="container",
            action="die",
            id="439f39ecc7ad",
            attributes={
                "exitCode": "0",
                "image": "flynn/primesum",
                "io.flynnsched.managed": "1",
                "name": "zen_almeida",
            },
            time_nano=1796414801400497802,
        ),
        Event(
            type="network",
            action="disconnect",
            id="2de8ab3afb3e",
            attributes={"container": "439f39ecc7ad", "name": "none", "type": "null"},
            time_nano=1796414801402218802,
        ),
    ]


def test_partial_line_is_pending() -> None:
    """An unfinished line gives no event and is reported as pending until its newline."""
    parser = EventLineParser()
    assert parser.feed(DIE_LINE[:50]) == []
    assert parser.pending == 50 and not parser.at_boundary
    assert [e.action for e in parser.feed(DIE_LINE[50:])] == ["die"]
    assert parser.at_boundary


def test_old_style_container_record() -> None:
    """A record with only status, id, from and time is a container event with its image."""
    event = event_from_record({"status": "start", "id": "abc", "from": "busybox", "time": 12})
    assert event == Event("container", "start", "abc", {"image": "busybox"}, 12 * 10**9)


def test_old_style_image_record() -> None:
    """A record with status and id but no from is an image event."""
    event = event_from_record({"status": "untag", "id": "sha256:ab", "time": 3})
    assert event == Event("image", "untag", "sha256:ab", {}, 3 * 10**9)


def test_current_fields_win_over_old_ones() -> None:
    """Type, Action, Actor and timeNano take precedence over status, id, from and time."""
    event = event_from_record(
        {
            "status": "old",
            "id": "old-id",
            "from": "old-image",
            "time": 1,
            "Type": "container",
            "Action": "kill",
            "Actor": {"ID": "new-id", "Attributes": {"signal": "15"}},
            "timeNano": 5,
        }
    )
    assert event == Event("container", "kill", "new-id", {"signal": "15"}, 5)


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"id": "a", "time": 1}, "neither Action nor status"),
        ({"Action": "start", "time": 1}, "neither Actor.ID nor id"),
        ({"Action": "start", "id": "a"}, "neither timeNano nor time"),
        ({"Action": "start", "id": "a", "timeNano": "5"}, "timeNano is not an integer"),
        ({"Action": "start", "id": "a", "timeNano": True}, "timeNano is not an integer"),
        ({"Action": "start", "id": "a", "time": 1.5}, "time is not an integer"),
        ({"Action": 3, "id": "a", "time": 1}, "Action is not a string"),
        ({"Action": "x", "Actor": [], "time": 1}, "Actor is not an object"),
        ({"Action": "x", "Actor": {"ID": 7}, "time": 1}, "Actor.ID is not a string"),
        (
            {"Action": "x", "Actor": {"ID": "a", "Attributes": {"exitCode": 1}}, "time": 1},
            "attribute 'exitCode' is not a string",
        ),
        ({"Action": "x", "Actor": {"ID": "a", "Attributes": "x"}, "time": 1}, "Attributes is not an object"),
    ],
)
def test_bad_records_name_the_problem(record: dict[str, object], problem: str) -> None:
    """A record missing a field or with a wrongly typed one raises an error naming it."""
    with pytest.raises(EventParseError, match=problem):
        event_from_record(record)


@pytest.mark.parametrize(
    "line, problem",
    [
        (b"not json\n", "not JSON"),
        (b'{"Action": \n', "not JSON"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"Action":"\xff"}\n', "not UTF-8"),
        (b'{"Action":"x","id":"a"}\n', "neither timeNano nor time"),
    ],
)
def test_malformed_line_raises_and_parser_goes_on(line: bytes, problem: str) -> None:
    """A bad line raises an error naming the problem; good lines around it are kept and later ones parse."""
    parser = EventLineParser()
    with pytest.raises(EventParseError, match=problem) as caught:
        parser.feed(DIE_LINE + line + NETWORK_LINE + DIE_LINE[:20])
    assert isinstance(caught.value, ValueError)
    assert [e.action for e in caught.value.events] == ["die", "disconnect"]
    assert [e.action for e in parser.feed(DIE_LINE[20:])] == ["die"]


def test_several_malformed_lines_in_one_chunk_are_all_named() -> None:
    """Two bad lines in one chunk give one error listing both."""
    with pytest.raises(EventParseError, match="2 malformed event lines") as caught:
        EventLineParser().feed(b"nope\n" + DIE_LINE + b"[]\n")
    assert len(caught.value.problems) == 2
    assert "not JSON" in caught.value.problems[0] and "not a JSON object" in caught.value.problems[1]
    assert [e.action for e in caught.value.events] == ["die"]


def test_on_error_skips_and_reports() -> None:
    """With on_error, bad lines are reported one by one and feed returns the good events."""
    reported: list[EventParseError] = []
    parser = EventLineParser(on_error=reported.append)
    events = parser.feed(b"nope\n" + DIE_LINE + b"[]\n" + NETWORK_LINE)
    assert [e.action for e in events] == ["die", "disconnect"]
    assert [str(r).split(" (")[0].split(":")[0] for r in reported] == [
        "event line is not JSON",
        "event line is not a JSON object",
    ]


@given(
    items=st.lists(
        st.one_of(
            events_strategy.map(to_line),
            st.binary(max_size=20).filter(lambda b: b"\n" not in b and b.strip()).map(lambda b: b + b"\n"),
        ),
        max_size=10,
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_garbage_at_arbitrary_splits_never_loses_good_events(items: list[bytes], cuts: list[int]) -> None:
    """Mixed good and bad lines at any split: raising and skipping modes both deliver every good event."""
    expected = []
    for line in items:
        try:
            expected.extend(EventLineParser().feed(line))
        except EventParseError:
            pass
    stream = b"".join(items)

    raising = EventLineParser()
    got_raising = []
    for chunk in split_at(stream, cuts):
        try:
            got_raising.extend(raising.feed(chunk))
        except EventParseError as e:
            got_raising.extend(e.events)

    reported: list[EventParseError] = []
    skipping = EventLineParser(on_error=reported.append)
    got_skipping = [e for chunk in split_at(stream, cuts) for e in skipping.feed(chunk)]

    assert got_raising == expected == got_skipping
    assert len(reported) == len(items) - len(expected)


def test_blank_lines_and_crlf_are_tolerated() -> None:
    """Empty lines are ignored and a CR before the newline does not matter."""
    parser = EventLineParser()
    events = parser.feed(b"\n\r\n  \n" + DIE_LINE[:-1] + b"\r\n")
    assert [e.action for e in events] == ["die"]


def test_overlong_line_is_skipped_without_growing() -> None:
    """A 3 MiB line is an error, is never held beyond the limit, and the next line parses."""
    reported: list[EventParseError] = []
    parser = EventLineParser(on_error=reported.append)
    body = b'{"Action":"' + b"x" * (3 * 1024 * 1024) + b'"}\n'
    events = []
    for i in range(0, len(body), 65536):
        events.extend(parser.feed(body[i : i + 65536]))
        assert parser.pending <= MAX_LINE
    events.extend(parser.feed(NETWORK_LINE))
    assert [e.action for e in events] == ["disconnect"]
    assert len(reported) == 1
    assert f"longer than {MAX_LINE} bytes" in str(reported[0])
    assert parser.at_boundary


def test_overlong_line_completed_in_one_chunk() -> None:
    """A line over the limit that arrives with its newline raises, and the lines after it still parse."""
    parser = EventLineParser(max_line=100)
    with pytest.raises(EventParseError, match="longer than 100 bytes") as caught:
        parser.feed(b"y" * 160 + b"\n" + b"z" * 40)
    assert caught.value.events == []
    with pytest.raises(EventParseError, match="longer than 100 bytes"):
        parser.feed(b"z" * 70 + b"\n" + NETWORK_LINE[:-1])
    # Exactly at the limit is fine.
    line = NETWORK_LINE[:-1]
    assert len(line) > 100
    assert [e.action for e in EventLineParser(max_line=len(line)).feed(NETWORK_LINE)] == ["disconnect"]


@given(size=st.integers(min_value=0, max_value=300), cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_line_limit_holds_at_any_split(size: int, cuts: list[int]) -> None:
    """A line is accepted exactly when it fits the limit, however it is cut."""
    limit = 200
    record = b'{"Action":"a","id":"","timeNano":1,"pad":"' + b"p" * size + b'"}'
    stream = record + b"\n" + b'{"Action":"next","id":"b","time":1}\n'
    reported: list[EventParseError] = []
    parser = EventLineParser(on_error=reported.append, max_line=limit)
    events = []
    for chunk in split_at(stream, cuts):
        events.extend(parser.feed(chunk))
        assert parser.pending <= limit
    fits = len(record) <= limit
    assert [e.action for e in events] == (["a", "next"] if fits else ["next"])
    assert len(reported) == (0 if fits else 1)
