"""Who is signed in to the dashboard: the API key, kept in an HTTP-only, SameSite=Strict cookie
scoped to ``/ui``, checked on every request exactly as the API checks it (``Keys``: a revoked key
stops working within ``KEY_TTL`` seconds), and the form token that refuses forged cross-site posts.

The form token is an HMAC of the key, so any gateway can check it without shared session state;
a state-changing request also needs an ``Origin`` (or ``Referer``) of this gateway's own origin
when the browser sends one.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import Response

from adapterdeck.registry.tenants import Principal
from adapterdeck.serve.auth import UI_COOKIE
from adapterdeck.serve.errors import ApiError

COOKIE = UI_COOKIE
COOKIE_PATH = "/ui"
SESSION_SECONDS = 12 * 3600
CSRF_FIELD = "csrf"


class SignIn(Exception):
    """No valid session: the page answers with the sign-in form (or 401 for a fetch)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class Forged(Exception):
    """A state-changing request without this session's form token or from another origin."""


@dataclass(frozen=True)
class Session:
    key: str
    who: Principal

    @property
    def csrf(self) -> str:
        return csrf_token(self.key)

    @property
    def label(self) -> str:
        return "admin" if self.who.is_admin else f"tenant {self.who.tenant}"


def csrf_token(key: str) -> str:
    return hmac.new(key.encode(), b"adapterdeck-ui-form", hashlib.sha256).hexdigest()


async def session(request: Request) -> Session:
    """The signed-in caller, or ``SignIn``."""
    key = request.cookies.get(COOKIE)
    if not key:
        raise SignIn()
    try:
        who = await request.app.state.keys.authenticate(key)
    except ApiError as exc:
        raise SignIn("Your session has ended: the key is no longer valid.") from exc
    return Session(key, who)


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another origin."""
    sent = request.headers.get("origin") or request.headers.get("referer")
    if not sent:
        return True  # not every client says; the form token still has to match
    parts = urlsplit(sent)  # "null" (an opaque origin) matches nothing
    return (parts.scheme, parts.netloc) == (request.url.scheme, request.url.netloc)


async def checked(request: Request, form_token: str | None) -> Session:
    """The session of a state-changing request: signed in, same origin, the right form token."""
    current = await session(request)
    if not same_origin(request) or not form_token or not hmac.compare_digest(form_token, current.csrf):
        raise Forged()
    return current


def sign_in(response: Response, request: Request, key: str) -> None:
    response.set_cookie(
        COOKIE, key, max_age=SESSION_SECONDS, path=COOKIE_PATH, httponly=True, samesite="strict",
        secure=_https(request),
    )  # fmt: skip


def sign_out(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=_https(request))


def _https(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
