"""The dashboard's way to everything it shows and does: the gateway's own HTTP API, called over
loopback with the signed-in key. So every page sees exactly what that key may see through the API
(tenant isolation, roles, limits, validation and error messages are the API's, not copies), and
the dashboard needs no access to anything the API does not give."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import Request

TIMEOUT = httpx.Timeout(60.0, connect=5.0)
STREAM_TIMEOUT = httpx.Timeout(600.0, connect=5.0)


class ApiFailed(Exception):
    """The API answered with an error: its status and message, shown on the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def path(*parts: str) -> str:
    """A URL path of these segments, each quoted whole (a ``/`` in one cannot add a segment)."""
    return "".join(f"/{quote(str(p), safe='')}" for p in parts)


def own_url(request: Request) -> str:
    """This gateway's address, as the socket that took ``request`` sees it."""
    host, port = request.scope.get("server") or ("127.0.0.1", 8000)
    if host in ("0.0.0.0", "", None):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


class Api:
    """One page's calls to the API as the signed-in key."""

    def __init__(self, request: Request, key: str) -> None:
        self.base = own_url(request)
        self.headers = {"Authorization": f"Bearer {key}"}

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        async with httpx.AsyncClient(base_url=self.base, timeout=TIMEOUT, trust_env=False) as client:
            response = await client.request(method, path, headers=self.headers, **kwargs)
        if response.status_code >= 400:
            raise ApiFailed(response.status_code, error_message(response))
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    async def report(self, path: str) -> Any:
        """GET a JSON body whatever the status (``/health`` answers 503 with its report)."""
        async with httpx.AsyncClient(base_url=self.base, timeout=TIMEOUT, trust_env=False) as client:
            response = await client.get(path, headers=self.headers)
        try:
            return response.json()
        except ValueError:
            raise ApiFailed(response.status_code, error_message(response)) from None

    async def get(self, path: str, **params: Any) -> Any:
        return await self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return (
            await self.call("POST", path, json=body, **kwargs)
            if body is not None
            else await self.call("POST", path, **kwargs)
        )

    async def maybe(self, path: str, **params: Any) -> Any:
        """GET, or None for a 404 (a version without a report, say)."""
        try:
            return await self.get(path, **params)
        except ApiFailed as exc:
            if exc.status == 404:
                return None
            raise

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[httpx.Response]:
        async with (
            httpx.AsyncClient(base_url=self.base, timeout=STREAM_TIMEOUT, trust_env=False) as client,
            client.stream("POST", path, json=body, headers=self.headers) as response,
        ):
            yield response
