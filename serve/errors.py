"""OpenAI-style JSON errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

from fastapi.responses import JSONResponse


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
