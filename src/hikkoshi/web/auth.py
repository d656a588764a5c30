"""Logging in to the dashboard: a person types the cluster's token on the login page and gets a session,
an opaque random id in a cookie (HttpOnly: no script reads it; SameSite=Strict: no other site's page
sends it, so no other site can act with it). The token itself never goes into the cookie or the page.
Sessions live in memory (a restarted dashboard asks again) and end after ``ttl`` seconds."""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

COOKIE = "hikkoshi_session"
#: A wrong token waits this long before its answer: guessing is slow.
WRONG_TOKEN_DELAY = 0.5


@dataclass
class Sessions:
    """The sessions of logged-in people."""

    token: str
    ttl: float = 12 * 3600.0
    _expiry: dict[str, float] = field(default_factory=dict)

    def login(self, offered: str) -> str | None:
        """A new session id if ``offered`` is the token, else ``None`` (compared in constant time)."""
        if not offered or not hmac.compare_digest(offered.strip().encode(), self.token.encode()):
            return None
        self._forget_expired()
        sid = secrets.token_urlsafe(32)
        self._expiry[sid] = time.monotonic() + self.ttl
        return sid

    def valid(self, sid: str | None) -> bool:
        """Whether ``sid`` is a live session."""
        if not sid:
            return False
        expiry = self._expiry.get(sid)
        if expiry is None:
            return False
        if expiry < time.monotonic():
            del self._expiry[sid]
            return False
        return True

    def logout(self, sid: str | None) -> None:
        """End a session."""
        if sid:
            self._expiry.pop(sid, None)

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for sid in [s for s, e in self._expiry.items() if e < now]:
            del self._expiry[sid]
