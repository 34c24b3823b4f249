"""Names of adapters and base models, and the reference syntax.

Names become directory names and URL path parts (served models, Hub repos), so they are
restricted up front instead of escaped later: letters, digits, `.`, `_`, `-`; no path
separators, no `..`, no control characters.

A reference (REF) is `name` (latest version), `name:version` or `name@sha256-prefix`. A version
is a whole number from 1 to `MAX_VERSION`, the range of the registry's version column on every
database it runs on; a sha prefix is at least `MIN_SHA_PREFIX` hex digits, so neither can carry
SQL wildcards into a lookup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterhub.errors import AdapterhubError, ValidationError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MIN_SHA_PREFIX = 4
# Versions are an INTEGER column: 64-bit on SQLite, 32-bit on PostgreSQL; the smaller range holds everywhere.
MAX_VERSION = 2**31 - 1


def name_problems(name: str) -> list[str]:
    """Everything wrong with `name`, empty when it is valid."""
    problems: list[str] = []
    if not name:
        return ["name is empty"]
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        problems.append(f"name {name!r} contains control characters")
    if "/" in name or "\\" in name:
        problems.append(f"name {name!r} contains a path separator")
    if ".." in name:
        problems.append(f"name {name!r} contains '..'")
    if not problems and not _NAME_RE.fullmatch(name):
        problems.append(
            f"name {name!r} must start with a letter or digit and hold only letters, digits, "
            "'.', '_' or '-' (at most 128 characters)"
        )
    return problems


def validate_name(name: str, *, what: str = "name") -> str:
    """Return `name` unchanged, or raise one error naming every problem with it."""
    problems = name_problems(name)
    if problems:
        raise ValidationError(f"invalid {what}", problems)
    return name


@dataclass(frozen=True)
class Ref:
    """A parsed reference: exactly one of `version` and `sha_prefix` may be set."""

    name: str
    version: int | None = None
    sha_prefix: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.sha_prefix is not None:
            return f"{self.name}@{self.sha_prefix}"
        return self.name


def parse_ref(text: str) -> Ref:
    """Parse `name`, `name:version` or `name@sha-prefix`; a malformed ref is a user error."""
    text = text.strip()
    if "@" in text:
        name, _, prefix = text.partition("@")
        prefix = prefix.lower().removeprefix("sha256:")
        if len(prefix) < MIN_SHA_PREFIX or not re.fullmatch(r"[0-9a-f]+", prefix):
            raise AdapterhubError(
                f"invalid reference {text!r}: after '@' give at least {MIN_SHA_PREFIX} hex digits of the sha256"
            )
        return Ref(validate_name(name, what="reference"), sha_prefix=prefix)
    if ":" in text:
        name, _, version = text.rpartition(":")
        # ASCII digits only (`str.isdigit` also takes '²'), and within the version column's range.
        if not re.fullmatch(r"[0-9]{1,40}", version) or not 1 <= int(version) <= MAX_VERSION:
            raise AdapterhubError(
                f"invalid reference {text[:80]!r}: the version after ':' must be a whole number from 1 to {MAX_VERSION}"
            )
        return Ref(validate_name(name, what="reference"), version=int(version))
    return Ref(validate_name(text, what="reference"))
