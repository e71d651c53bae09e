"""Every error the gateway answers, in one place: OpenAI-style JSON
(``{"error": {"message", "type", "param", "code"}}``) with the right status.

What a deliberate error means is its class's ``http_status`` (see ``core/errors.py`` and
``registry/errors.py``): a user mistake 400, ``NotFound`` 404, ``Conflict`` 409, a ``Fault``
(corrupt or missing blobs, unusable storage) 500. A fault's message, and that of any unexpected
exception, goes to the log under an incident id; the client sees only the id. docs/api.md lists
the taxonomy.
"""

from __future__ import annotations

import errno
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adapterdeck.core.errors import AdapterdeckError, Fault

logger = logging.getLogger("adapterdeck.serve")


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers: dict[str, str] | None = None

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param=param)


def unauthorized(message: str = "Missing or invalid API key (Authorization: Bearer KEY).") -> ApiError:
    return ApiError(401, message, "authentication_error", code="invalid_api_key")


def forbidden(message: str) -> ApiError:
    return ApiError(403, message, "permission_error")


def model_not_found(model: str) -> ApiError:
    # The same answer for an unknown model and another tenant's: nothing leaks.
    shown = model if len(model) <= 200 else model[:200] + "..."
    return ApiError(
        404,
        f"The model '{shown}' does not exist or you do not have access to it.",
        "invalid_request_error",
        code="model_not_found",
        param="model",
    )


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, "service_unavailable", code="engine_unavailable")


def incident(exc: BaseException) -> ApiError:
    """A 500 that names only an incident id: a fault's message, or an unexpected exception's
    traceback, goes to the log under that id, never to the client (it may hold secrets)."""
    number = uuid.uuid4().hex[:12]
    if isinstance(exc, Fault):
        logger.error("server fault (incident %s): %s", number, exc)
    else:
        logger.error("unexpected error (incident %s)", number, exc_info=exc)
    message = f"internal error (incident {number}); the server log has the details"
    status = exc.http_status if isinstance(exc, AdapterdeckError) else 500
    return ApiError(status, message, "server_error")


def api_error(exc: AdapterdeckError, message: str | None = None, code: str | None = None) -> ApiError:
    """The answer to a deliberate error: its class's status with its message (``message``, when
    given, says it better), or for a ``Fault`` an incident id only."""
    if isinstance(exc, Fault):  # the server's problem: its details go to the log only
        return incident(exc)
    return ApiError(exc.http_status, message or str(exc), "invalid_request_error", code=code)


def install(app: FastAPI) -> None:
    """Answer every error on ``app`` in the one shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # An unknown route or method: the same error shape as everything else.
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(AdapterdeckError)
    async def _deliberate(_: Request, exc: AdapterdeckError) -> JSONResponse:
        return api_error(exc).response()

    @app.exception_handler(OSError)
    async def _storage_error(_: Request, exc: OSError) -> JSONResponse:
        # A full disk (507) or storage that cannot be written now (503): the client may retry.
        logger.error("storage error: %s", exc)
        status = 507 if exc.errno == errno.ENOSPC else 503
        message = f"the registry's storage cannot be written: {exc.strerror or type(exc).__name__}"
        return ApiError(status, message, "server_error", code="storage_error").response()

    @app.exception_handler(ClientDisconnect)
    async def _disconnected(request: Request, _: ClientDisconnect) -> Response:
        # The client hung up before its body was in: nobody to answer, nothing went wrong here.
        where = f"{request.method} {request.url.path}"
        logger.info("client disconnected before its request body was in: %s", where)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return incident(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return bad_request(f"{where}: {first.get('msg', 'invalid request')}", where or None).response()
