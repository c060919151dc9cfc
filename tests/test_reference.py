"""
Tests for ``flynnsched.reference``: Docker's own reference test table, round trips, and a
comparison with Docker's regular expressions on generated near-miss strings.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from flynnsched.reference import InvalidReference, Reference, parse_reference

F64 = "f" * 64
F128 = "f" * 128

# Valid references from Docker's reference_test.go (TestReferenceParse, TestDomainAndPath,
# TestSerialization) plus our own, with (domain, path, tag, digest). Docker's bare ``Parse`` takes
# any first component as a domain ("foo/foo_bar.com" has domain "foo"); here, as in the CLI, only
# one with '.' or ':' or "localhost" is.
VALID = [
    ("test_com", None, "test_com", None, None),
    ("test.com:tag", None, "test.com", "tag", None),
    ("test.com:5000", None, "test.com", "5000", None),
    ("test.com/repo:tag", "test.com", "repo", "tag", None),
    ("test:5000/repo", "test:5000", "repo", None, None),
    ("test:5000/repo:tag", "test:5000", "repo", "tag", None),
    (f"test:5000/repo@sha256:{F64}", "test:5000", "repo", None, f"sha256:{F64}"),
    (f"test:5000/repo:tag@sha256:{F64}", "test:5000", "repo", "tag", f"sha256:{F64}"),
    ("lowercase:Uppercase", None, "lowercase", "Uppercase", None),
    ("a/" * 127 + "a:tag-puts-this-over-max", None, "a/" * 127 + "a", "tag-puts-this-over-max", None),
    ("sub-dom1.foo.com/bar/baz/quux", "sub-dom1.foo.com", "bar/baz/quux", None, None),
    ("sub-dom1.foo.com/bar/baz/quux:some-long-tag", "sub-dom1.foo.com", "bar/baz/quux", "some-long-tag", None),
    ("b.gcr.io/test.example.com/my-app:test.example.com", "b.gcr.io", "test.example.com/my-app", "test.example.com", None),
    ("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com", "myimage", "xn--n3h.com", None),
    (
        f"xn--7o8h.com/myimage:xn--7o8h.com@sha512:{F128}",
        "xn--7o8h.com",
        "myimage",
        "xn--7o8h.com",
        f"sha512:{F128}",
    ),
    ("foo_bar.com:8080", None, "foo_bar.com", "8080", None),
    ("foo/foo_bar.com:8080", None, "foo/foo_bar.com", "8080", None),
    ("192.168.1.1", None, "192.168.1.1", None, None),
    ("192.168.1.1:tag", None, "192.168.1.1", "tag", None),
    ("192.168.1.1:5000", None, "192.168.1.1", "5000", None),
    ("192.168.1.1/repo", "192.168.1.1", "repo", None, None),
    ("192.168.1.1:5000/repo", "192.168.1.1:5000", "repo", None, None),
    ("192.168.1.1:5000/repo:5050", "192.168.1.1:5000", "repo", "5050", None),
    ("[2001:db8::1]/repo", "[2001:db8::1]", "repo", None, None),
    ("[2001:db8:1:2:3:4:5:6]/repo:tag", "[2001:db8:1:2:3:4:5:6]", "repo", "tag", None),
    ("[2001:db8::1]:5000/repo", "[2001:db8::1]:5000", "repo", None, None),
    ("[2001:db8::1]:5000/repo:tag", "[2001:db8::1]:5000", "repo", "tag", None),
    (f"[2001:db8::1]:5000/repo@sha256:{F64}", "[2001:db8::1]:5000", "repo", None, f"sha256:{F64}"),
    (f"[2001:db8::1]:5000/repo:tag@sha256:{F64}", "[2001:db8::1]:5000", "repo", "tag", f"sha256:{F64}"),
    ("[2001:db8::]:5000/repo", "[2001:db8::]:5000", "repo", None, None),
    ("[::1]:5000/repo", "[::1]:5000", "repo", None, None),
    ("test.com/foo", "test.com", "foo", None, None),
    ("test_com/foo", None, "test_com/foo", None, None),
    ("test:8080/foo", "test:8080", "foo", None, None),
    ("test.com:8080/foo", "test.com:8080", "foo", None, None),
    ("test-com:8080/foo", "test-com:8080", "foo", None, None),
    ("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo", None, None),
    ("example.com:8000/named:tagged", "example.com:8000", "named", "tagged", None),
    (
        "other.com/named@sha256:1234567890098765432112345667890098765432112345667890098765432112",
        "other.com",
        "named",
        None,
        "sha256:1234567890098765432112345667890098765432112345667890098765432112",
    ),
    ("flynn/busybox", None, "flynn/busybox", None, None),
    ("flynn/primesum:v1", None, "flynn/primesum", "v1", None),
    ("localhost/app", "localhost", "app", None, None),
    ("localhost:5000/team/app:1.2", "localhost:5000", "team/app", "1.2", None),
    ("localhost", None, "localhost", None, None),
    ("Registry.example/app", "Registry.example", "app", None, None),
    ("a__b/c--d/e.f/g_h", None, "a__b/c--d/e.f/g_h", None, None),
    ("my_team.v2/app", None, "my_team.v2/app", None, None),
    (f"app:{'t' * 128}", None, "app", "t" * 128, None),
    (f"{F64}:tag", None, F64, "tag", None),
    (f"app@sha384:{'a' * 96}", None, "app", None, f"sha384:{'a' * 96}"),
    ("example.com/" + "a" * 243, "example.com", "a" * 243, None, None),
]

# Invalid references from the same tests and the cases this project must refuse, each with a
# fragment of the message that has to name the problem.
INVALID = [
    ("", "empty"),
    (":justtag", "no repository name"),
    (f"@sha256:{F64}", "no repository name"),
    ("repo@sha256:" + "f" * 34, "sha256 needs 64 hex digits, not 34"),
    (f"validname@invaliddigest:{F64}", "unsupported digest algorithm 'invaliddigest'"),
    ("Uppercase:tag", "repository name must be lowercase: 'Uppercase'"),
    ("test:5000/Uppercase/lowercase:tag", "must be lowercase: 'Uppercase/lowercase'"),
    ("a/" * 128 + "a:tag", "must not be more than 255 characters (it has 257)"),
    ("aa/asdf$$^/aa", "invalid path component 'asdf$$^'"),
    ("[2001:db8::1]", "invalid path component"),
    ("[2001:db8::1]:5000", "invalid path component"),
    ("[2001:db8::1]:tag", "invalid path component"),
    ("[fe80::1%eth0]:5000/repo", "invalid registry host '[fe80::1%eth0]:5000'"),
    ("[fe80::1%@invalidzone]:5000/repo", "invalid"),
    ("UPPER/Case", "repository name must be lowercase: 'UPPER/Case'"),
    ("Localhost/app", "must be lowercase"),
    ("a/../b", "invalid path component '..'"),
    ("a//b", "empty path component in 'a//b'"),
    ("/a", "empty path component"),
    ("a/", "must not end with '/'"),
    ("example.com/", "must not end with '/'"),
    (":tag", "no repository name"),
    ("a:", "empty tag"),
    ("a@", "empty digest"),
    ("a:-tag", "invalid tag '-tag'"),
    ("a:.tag", "invalid tag '.tag'"),
    (f"app:{'t' * 129}", "invalid tag"),
    ("a:b:c", "invalid path component 'a:b'"),
    ("a:b/c", "invalid registry host 'a:b'"),
    ("exa_mple.com:80/app", "invalid registry host"),
    (F64, "image id"),
    (f"a@sha256:{'F' * 64}", "lowercase"),
    (f"a@sha256:{F64}0", "needs 64 hex digits, not 65"),
    (f"a@sha256:{'g' * 64}", "invalid digest"),
    ("a@sha256:abc", "invalid digest"),
    ("a@b@c", "invalid digest"),
    ("-a", "invalid path component '-a'"),
    ("a-", "invalid path component 'a-'"),
    ("a___b", "invalid path component"),
    ("a..b", "invalid path component"),
    ("a._b", "invalid path component"),
    ("ubuntu\n", "invalid path component"),
    ("übuntu", "invalid path component"),
    ("app:tägg", "invalid tag"),
    ("a b", "invalid path component"),
    ("x" * 300, "must not be more than 255"),
    ("a/" * 127 + "ab", "must not be more than 255 characters (it has 256)"),
    ("example.com/" + "a" * 244, "must not be more than 255 characters (it has 256)"),
]


@pytest.mark.parametrize("text, domain, path, tag, digest", VALID)
def test_valid_references(
    text: str, domain: str | None, path: str, tag: str | None, digest: str | None
) -> None:
    """Each valid reference splits into the expected parts and prints back as written."""
    ref = parse_reference(text)
    assert ref == Reference(domain=domain, path=path, tag=tag, digest=digest)
    assert str(ref) == text
    assert ref.name == (path if domain is None else f"{domain}/{path}")


@pytest.mark.parametrize("text, problem", INVALID)
def test_invalid_references(text: str, problem: str) -> None:
    """Each invalid reference raises InvalidReference with a message naming the problem."""
    with pytest.raises(InvalidReference) as caught:
        parse_reference(text)
    assert isinstance(caught.value, ValueError)
    assert problem in str(caught.value)


def test_for_engine() -> None:
    """The engine gets :latest when nothing pins the image, and the digest alone when both are given."""
    assert parse_reference("flynn/busybox").for_engine == "flynn/busybox:latest"
    assert parse_reference("localhost:5000/app").for_engine == "localhost:5000/app:latest"
    assert parse_reference("flynn/busybox:1").for_engine == "flynn/busybox:1"
    assert parse_reference(f"app@sha256:{F64}").for_engine == f"app@sha256:{F64}"
    assert parse_reference(f"app:1@sha256:{F64}").for_engine == f"app@sha256:{F64}"


def test_reference_is_frozen() -> None:
    """References are immutable values."""
    ref = parse_reference("flynn/busybox")
    with pytest.raises(AttributeError):
        ref.path = "other"  # type: ignore[misc]
    assert ref == parse_reference("flynn/busybox") and hash(ref) == hash(parse_reference("flynn/busybox"))


# Docker's regular expressions, composed as distribution/reference composes them, with the CLI's
# splitting rule (ParseNormalizedNamed) on top: the oracle for the generated comparisons.
_ALNUM = r"[a-z0-9]+"
_PATH_COMPONENT = _ALNUM + r"(?:(?:[._]|__|[-]+)" + _ALNUM + r")*"
_REMOTE_NAME = _PATH_COMPONENT + r"(?:/" + _PATH_COMPONENT + r")*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = r"(?:" + _DOMAIN_COMPONENT + r"(?:\." + _DOMAIN_COMPONENT + r")*|\[(?:[a-fA-F0-9:]+)\])"
_DOMAIN_AND_PORT = _HOST + r"(?::[0-9]+)?"
_NAME = r"(?:" + _DOMAIN_AND_PORT + r"/)?" + _REMOTE_NAME
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9a-fA-F]{32,}"
REFERENCE_RE = re.compile(r"(" + _NAME + r")(?::(" + _TAG + r"))?(?:@(" + _DIGEST + r"))?", re.ASCII)
ANCHORED_NAME_RE = re.compile(r"(?:(" + _DOMAIN_AND_PORT + r")/)?(" + _REMOTE_NAME + r")", re.ASCII)
IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}", re.ASCII)
DIGEST_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}


def docker_parse(s: str) -> tuple[str | None, str, str | None, str | None] | None:
    """What Docker makes of ``s``: (domain, path, tag, digest), or None when it refuses it."""
    if not s or IDENTIFIER_RE.fullmatch(s):
        return None
    first, slash, rest = s.partition("/")
    has_domain = bool(slash) and (first == "localhost" or "." in first or ":" in first)
    remainder = rest if has_domain else s
    remote = remainder.split(":", 1)[0]
    if remote.lower() != remote:
        return None
    # Docker prefixes names without a domain with its default one before matching.
    prefix = "" if has_domain else "docker.io/"
    match = REFERENCE_RE.fullmatch(prefix + s)
    if not match:
        return None
    name, tag, digest = match.group(1)[len(prefix) :], match.group(2), match.group(3)
    if len(name) > 255:
        return None
    if digest is not None:
        algorithm, _, encoded = digest.partition(":")
        if DIGEST_LENGTHS.get(algorithm) != len(encoded) or encoded != encoded.lower():
            return None
    if has_domain:
        name_match = ANCHORED_NAME_RE.fullmatch(name)
        assert name_match is not None
        domain, path = name_match.group(1), name_match.group(2)
    else:
        domain, path = None, name
    return domain, path, tag, digest


TOKENS = [
    "a", "b", "z", "0", "9", "A", "Q", "-", "--", "_", "__", ".", ":", "/", "//", "@", "[", "]",
    "::1", "localhost", "example.com", "5000", "latest", "v1.0", f"sha256:{F64}", f"sha512:{F128}",
    f"sha256:{'F' * 64}", f"md5:{'a' * 32}", f"sha256:{'a' * 32}", "é", " ", "\n", "%", "a" * 120,
]
near_misses = st.lists(st.sampled_from(TOKENS), max_size=12).map("".join)


@given(text=st.one_of(near_misses, st.text(max_size=30)))
def test_agrees_with_dockers_regular_expressions(text: str) -> None:
    """On generated near-misses, parse_reference accepts exactly what Docker does, with the same parts."""
    expected = docker_parse(text)
    try:
        ref = parse_reference(text)
    except InvalidReference as e:
        assert expected is None, f"refused {text!r} ({e}) that Docker accepts as {expected}"
        assert str(e)
    else:
        assert expected == (ref.domain, ref.path, ref.tag, ref.digest)
        assert str(ref) == text


domains = st.one_of(
    st.just("localhost"),
    st.from_regex(r"localhost:[0-9]{1,5}", fullmatch=True),
    st.from_regex(
        r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?)+(:[0-9]{1,5})?",
        fullmatch=True,
    ),
    st.from_regex(r"[a-z0-9]{1,10}:[0-9]{1,5}", fullmatch=True),
    st.from_regex(r"\[[a-fA-F0-9]{0,4}:[a-fA-F0-9:]{0,16}\](:[0-9]{1,5})?", fullmatch=True),
)
path_components = st.from_regex(r"[a-z0-9]{1,5}(([._]|__|-{1,3})[a-z0-9]{1,5}){0,3}", fullmatch=True)
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", fullmatch=True)
digests = st.sampled_from([("sha256", 64), ("sha384", 96), ("sha512", 128)]).flatmap(
    lambda alg: st.text("0123456789abcdef", min_size=alg[1], max_size=alg[1]).map(lambda h: f"{alg[0]}:{h}")
)


@st.composite
def references(draw: st.DrawFn) -> Reference:
    """Valid references, built part by part."""
    domain = draw(st.none() | domains)
    components = draw(st.lists(path_components, min_size=1, max_size=5))
    if domain is None and len(components) > 1:
        # Without a domain, a first component that looks like one would be read as one.
        assume("." not in components[0] and components[0] != "localhost")
    ref = Reference(
        domain=domain,
        path="/".join(components),
        tag=draw(st.none() | tags),
        digest=draw(st.none() | digests),
    )
    assume(len(ref.name) <= 255)
    return ref


@given(ref=references())
def test_round_trip(ref: Reference) -> None:
    """Printing a reference and parsing it back gives the same reference, and Docker agrees on it."""
    text = str(ref)
    assert parse_reference(text) == ref
    assert docker_parse(text) == (ref.domain, ref.path, ref.tag, ref.digest)
    engine = parse_reference(ref.for_engine)
    assert engine.name == ref.name
    assert engine.digest == ref.digest
    assert engine.tag == (None if ref.digest else ref.tag or "latest")
