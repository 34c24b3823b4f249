"""Every error leaves the server in OpenAI's shape: `{"error": {message, type, param, code}}`.

Design decisions:
- Errors are turned into responses only here, at the HTTP edge (as vLLM's `serving_models.py`
  does); backends and resolvers raise plain `AdapterhubError` subclasses.
- Each error class carries its answer. The backends' errors (`backends/base.py::BackendError`)
  name their HTTP status, OpenAI `code` and `type` and the field they concern as class
  attributes, as vLLM's error classes carry theirs, so `from_exception` reads attributes and
  never tests classes one by one: a new backend's errors need no change here. The core's errors
  (`adapterhub.errors`, which know nothing of HTTP) get theirs from one table, looked up along
  the class's MRO, so a subclass answers like its nearest listed ancestor.
- Status codes: unknown model 404; malformed JSON 400; a body that parses but breaks the schema
  400 `invalid_value` (the field goes in `param`; OpenAI and vLLM answer 400 there, not
  FastAPI's 422, so `openai.BadRequestError` catches it); prompt over the context window 400
  `context_length_exceeded`; an adapter that cannot be loaded 400 `adapter_load_failed` (only
  that request fails); sampling settings that leave no finite logit (a penalty that
  overflows, `min_tokens` masking everything) 400 with the setting in `param`; the model
  itself producing non-finite logits 500 `generation_failed`; queue full 429; engine not
  running or every slot pinned 503; missing or wrong API key 401. Anything else is a bug: 500
  with no internals in the message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterhub.errors import AdapterhubError, AmbiguousRefError, NotFoundError
from adapterhub.serving.backends.base import BackendError

logger = logging.getLogger(__name__)


class OpenAIError(Exception):
    """An error response the server means to send, with its status and OpenAI fields."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status_code == 401 else None
        return JSONResponse(self.body(), status_code=self.status_code, headers=headers)


def model_not_found(model: str, known: list[str], *, param: str = "model") -> OpenAIError:
    """404 for an unknown `model`, naming close matches so a typo is easy to see."""
    import difflib

    close = difflib.get_close_matches(model, known, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return OpenAIError(404, f"The model `{model}` does not exist{hint}", param=param, code="model_not_found")


@dataclass(frozen=True)
class _Answer:
    """How the edge answers one of the core's errors (which carry no HTTP facts of their own)."""

    status_code: int
    code: str | None = None
    param: str | None = None


# The core's errors, most specific first; `AdapterhubError` is any other user error.
_CORE_ANSWERS: dict[type[AdapterhubError], _Answer] = {
    NotFoundError: _Answer(404, "not_found"),
    AmbiguousRefError: _Answer(400, "ambiguous_model", param="model"),
    AdapterhubError: _Answer(400),
}


def from_exception(exc: BaseException, *, param: str | None = None) -> OpenAIError:
    """The response `exc` deserves. `param` names the request field that carried what failed,
    for errors that concern a field (an adapter named as `lora_name` rather than `model`)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, BackendError):
        field_name = exc.param or (param if exc.default_param is not None else None) or exc.default_param
        return OpenAIError(exc.status_code, str(exc), type=exc.error_type, param=field_name, code=exc.code)
    answer = next((_CORE_ANSWERS[cls] for cls in type(exc).__mro__ if cls in _CORE_ANSWERS), None)
    if answer is not None:
        return OpenAIError(answer.status_code, str(exc), param=answer.param, code=answer.code)
    logger.error("internal error", exc_info=exc)
    return OpenAIError(500, "internal server error", type="server_error", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Make every failure path of `app` answer in OpenAI's error shape."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(AdapterhubError)
    async def _adapterhub_error(_: Request, exc: AdapterhubError) -> JSONResponse:
        return from_exception(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(error.get("type") == "json_invalid" for error in errors):
            return OpenAIError(400, "the request body is not valid JSON", code="invalid_json").response()
        first = errors[0] if errors else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        details = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors
        )
        return OpenAIError(400, details or "invalid request body", param=".".join(location) or None, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return OpenAIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()
