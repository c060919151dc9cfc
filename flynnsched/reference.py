"""
Docker image references (``registry.example:5000/team/app:1.2@sha256:…``), validated and split
exactly as Docker reads them.

The grammar is Docker's own (the ``distribution/reference`` package)::

    reference       := name [ ":" tag ] [ "@" digest ]
    name            := [ domain "/" ] path                 at most 255 characters
    domain          := host [ ":" port ]
    host            := domain-name | "[" IPv6 address "]"
    domain-name     := domain-component [ "." domain-component ]*
    domain-component:= [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
    port            := [0-9]+
    path            := path-component [ "/" path-component ]*
    path-component  := [a-z0-9]+ ( ( [._] | "__" | "-"+ ) [a-z0-9]+ )*
    tag             := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest          := algorithm ":" hex               sha256, sha384 or sha512, lower-case hex of
                                                       64, 96 or 128 digits

As in the Docker CLI, the first component of a name with a ``/`` is the registry domain only when
it contains a ``.`` or a ``:`` or is ``localhost`` (``flynn/busybox`` has no domain,
``localhost/x`` and ``example.com/x`` do), and a name may not be 64 hexadecimal digits alone, which
Docker would read as an image id.

Errors are ``InvalidReference`` (a ``ValueError``) whose message names the problem, fit to show to
whoever typed the reference.
"""

from __future__ import annotations

import re

import attrs

__all__ = ["NAME_TOTAL_LENGTH_MAX", "InvalidReference", "Reference", "parse_reference"]

#: The longest name (domain and path, without tag or digest) Docker accepts.
NAME_TOTAL_LENGTH_MAX = 255
#: The tag the engine assumes when a reference has neither tag nor digest.
DEFAULT_TAG = "latest"

# Character classes are spelled out: Python's \w and \d also match non-ASCII characters.
_ALPHANUMERIC = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = re.compile(_ALPHANUMERIC + r"(?:" + _SEPARATOR + _ALPHANUMERIC + r")*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = _DOMAIN_COMPONENT + r"(?:\." + _DOMAIN_COMPONENT + r")*"
_IPV6_ADDRESS = r"\[[a-fA-F0-9:]+\]"
_DOMAIN = re.compile(r"(?:" + _DOMAIN_NAME + r"|" + _IPV6_ADDRESS + r")(?::[0-9]+)?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_IDENTIFIER = re.compile(r"[a-f0-9]{64}")
_HEX_LOWER = re.compile(r"[a-f0-9]+")
#: The digest algorithms the engine knows, with the length of their hex encoding.
_DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}


class InvalidReference(ValueError):
    """The text is not a Docker image reference; the message says why."""


@attrs.frozen
class Reference:
    """
    A valid image reference, split into its parts.

    ``domain`` (registry host and port) is None when the name has none; ``path`` is the rest of the
    name; ``tag`` and ``digest`` (``algorithm:hex``) are None when absent. ``str()`` gives the
    reference as written.
    """

    domain: str | None
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The repository name: domain and path, without tag or digest."""
        return self.path if self.domain is None else f"{self.domain}/{self.path}"

    @property
    def for_engine(self) -> str:
        """
        The reference to hand to the engine: ``:latest`` added when there is neither tag nor
        digest, and only the digest kept when there are both (the digest pins the image, as
        Docker's own ``ParseDockerRef`` decides).
        """
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag if self.tag is not None else DEFAULT_TAG}"

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += ":" + self.tag
        if self.digest is not None:
            text += "@" + self.digest
        return text


def _check_digest(digest: str) -> None:
    """Raise ``InvalidReference`` unless ``digest`` is one the engine can use."""
    if not _DIGEST.fullmatch(digest):
        raise InvalidReference(
            f"invalid digest {digest!r}: expected algorithm:hex, e.g. sha256:<64 hex digits>"
        )
    algorithm, _, encoded = digest.partition(":")
    length = _DIGEST_HEX_LENGTHS.get(algorithm)
    if length is None:
        raise InvalidReference(
            f"unsupported digest algorithm {algorithm!r} in {digest!r}: expected one of "
            + ", ".join(_DIGEST_HEX_LENGTHS)
        )
    if len(encoded) != length:
        raise InvalidReference(
            f"invalid digest {digest!r}: {algorithm} needs {length} hex digits, not {len(encoded)}"
        )
    if not _HEX_LOWER.fullmatch(encoded):
        raise InvalidReference(f"invalid digest {digest!r}: hex digits must be lowercase")


def _split_domain(name: str) -> tuple[str | None, str]:
    """Split a name into its domain (None when it has none) and path, as the Docker CLI does."""
    first, slash, rest = name.partition("/")
    if slash and (first == "localhost" or "." in first or ":" in first):
        if _DOMAIN.fullmatch(first):
            return first, rest
        if not _PATH_COMPONENT.fullmatch(first):
            raise InvalidReference(f"invalid registry host {first!r} in {name!r}")
        # Docker falls back on reading it as a path component, e.g. ``my_team.v2/app``.
    return None, name


def _check_path(path: str, text: str) -> None:
    """Raise ``InvalidReference`` naming the first thing wrong with ``path``."""
    if path != path.lower():
        raise InvalidReference(f"repository name must be lowercase: {path!r}")
    for component in path.split("/"):
        if not component:
            raise InvalidReference(f"empty path component in {text!r}")
        if not _PATH_COMPONENT.fullmatch(component):
            raise InvalidReference(
                f"invalid path component {component!r}: use lowercase letters and digits, "
                "separated by '.', '_', '__' or dashes"
            )


def parse_reference(text: str) -> Reference:
    """
    Parse and validate an image reference.

    :raises InvalidReference: naming what is wrong.
    """
    if not text:
        raise InvalidReference("image reference is empty")
    if _IDENTIFIER.fullmatch(text):
        raise InvalidReference(
            f"invalid repository name {text!r}: 64 hexadecimal digits are an image id, not a name"
        )

    name_tag, at, digest = text.partition("@")
    if at and not digest:
        raise InvalidReference(f"empty digest after '@' in {text!r}")
    # Only a domain may hold ':' before the last '/', so a ':' after it starts the tag.
    colon = name_tag.rfind(":")
    if colon > name_tag.rfind("/"):
        name, tag = name_tag[:colon], name_tag[colon + 1 :]
        if not tag:
            raise InvalidReference(f"empty tag after ':' in {text!r}")
    else:
        name, tag = name_tag, None
    if not name:
        raise InvalidReference(f"image reference has no repository name: {text!r}")
    if len(name) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidReference(
            f"repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters "
            f"(it has {len(name)})"
        )

    if name.endswith("/"):
        raise InvalidReference(f"repository name must not end with '/': {text!r}")
    domain, path = _split_domain(name)
    _check_path(path, text)
    if tag is not None and not _TAG.fullmatch(tag):
        raise InvalidReference(
            f"invalid tag {tag!r}: use up to 128 letters, digits, '_', '.' and '-', "
            "not starting with '.' or '-'"
        )
    if at:
        _check_digest(digest)
    return Reference(domain=domain, path=path, tag=tag, digest=digest if at else None)
