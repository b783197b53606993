"""Who calls the API: named API tokens, and whose jobs a caller may change.

``HUTCH_API_TOKENS`` entries are ``name:token`` (a user or a team), ``name:token:admin`` (may
change any job), or a plain ``token`` as before names existed: an admin named
``token-<first 8 hex of its SHA-256>``, so that a service configured the old way keeps working
and its audit lines still tell its tokens apart without showing them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$"
_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True)
class Caller:
    """The holder of the token a request came with."""

    name: str
    admin: bool

    def may_change(self, submitted_by: str | None) -> bool:
        """Whether this caller may cancel, retry or delete a job ``submitted_by`` someone: its
        own, or any as an admin (jobs from before names belong to admins)."""
        return self.admin or (submitted_by is not None and submitted_by == self.name)


def plain_token_name(token: str) -> str:
    return f"token-{hashlib.sha256(token.encode()).hexdigest()[:8]}"


def parse_tokens(entries: Iterable[str]) -> dict[str, Caller]:
    """Token → caller for each entry; ValueError naming the entry's place (never the token) if
    one is malformed or a token is given twice."""
    callers: dict[str, Caller] = {}
    for place, entry in enumerate(entries, start=1):
        parts = entry.split(":")
        if len(parts) == 1:
            token, caller = parts[0], Caller(plain_token_name(parts[0]), admin=True)
        elif len(parts) in (2, 3):
            name, token = parts[0], parts[1]
            if not _NAME.fullmatch(name):
                raise ValueError(f"entry {place}: the name {name!r} must match {NAME_PATTERN}")
            if len(parts) == 3 and parts[2] != "admin":
                raise ValueError(f"entry {place}: after name:token only ':admin' may follow")
            caller = Caller(name, admin=len(parts) == 3)
        else:
            raise ValueError(f"entry {place}: expected token, name:token or name:token:admin")
        if not token:
            raise ValueError(f"entry {place}: the token is empty")
        if token in callers:
            raise ValueError(f"entry {place}: the same token is given twice")
        callers[token] = caller
    return callers


def token_of(entry: str) -> str:
    """The token itself in an entry (what a client sends)."""
    parts = entry.split(":")
    return parts[1] if len(parts) > 1 else parts[0]
