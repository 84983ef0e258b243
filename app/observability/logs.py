"""One log format for the whole process (ours, uvicorn's, SQLAlchemy's,
litellm's): ``text`` for people, ``json`` (one object per line) for machines.

Every line says which request and which run it concerns when it concerns
one: the request id (the ``x-request-id`` answered to the client) and the run
id live in context variables, set by the request middleware (app/observability/http.py)
and by the run executor, and a filter copies them onto each record.

Secrets never reach the output: every formatted line goes through a redactor
that masks the configured API keys, ``Bearer`` tokens and key-like query
parameters (``?api-key=``, ``?key=``, ``?api_key=``), wherever they appear.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
REDACTED = "[redacted]"

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_run_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("run_id", default=None)
# The ASGI scope of the request being served: the router fills its
# path_params in place, so lines logged by a route about /runs/{run_id} name the run.
_scope: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("asgi_scope", default=None)

# litellm attaches a handler of its own to these and lets records propagate
# too: every line would print twice, in two formats (see adopt_litellm_loggers).
LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")
# Third-party loggers that are chatty at INFO about things we log better ourselves.
_QUIET_LOGGERS = (*LITELLM_LOGGERS, "httpx", "httpcore")

_KEY_QUERY = re.compile(r"(?i)([?&](?:api[-_]?key|key|access[-_]?token)=)[^&\s\"'\\]+")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[^\s\"'\\,]+")
# Keys made by `keys create` (app/services/api_keys.py): their visible prefix
# stays readable, the rest is masked (the log cannot know them by value).
_STORED_KEY = re.compile(r"(\bsk-proj-[A-Za-z0-9_-]{8})[A-Za-z0-9_-]{8,}")


# --------------------------------------------------------------------- context


def bind_request(request_id: str, scope: Mapping[str, Any]) -> tuple[contextvars.Token[Any], ...]:
    return _request_id.set(request_id), _scope.set(scope), _run_id.set(None)


def unbind_request(tokens: tuple[contextvars.Token[Any], ...]) -> None:
    request_token, scope_token, run_token = tokens
    _run_id.reset(run_token)
    _scope.reset(scope_token)
    _request_id.reset(request_token)


def bind_run(run_id: str) -> None:
    """The rest of the current task (and tasks it starts) concerns this run."""
    _run_id.set(run_id)


def current_request_id() -> str | None:
    return _request_id.get()


def current_run_id() -> str | None:
    run_id = _run_id.get()
    if run_id is None:
        scope = _scope.get()
        params = scope.get("path_params") if scope is not None else None
        run_id = params.get("run_id") if isinstance(params, Mapping) else None
    return run_id if isinstance(run_id, str) else None


class ContextFilter(logging.Filter):
    """Stamps request_id and run_id on each record (unless the caller passed
    them in ``extra``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        if getattr(record, "run_id", None) is None:
            record.run_id = current_run_id()
        return True


# ------------------------------------------------------------------- redaction


class Redactor:
    def __init__(self, secrets: Sequence[str] = ()) -> None:
        # Longest first, so a key that contains another is masked whole.
        self.secrets = sorted({secret for secret in secrets if secret}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _KEY_QUERY.sub(rf"\1{REDACTED}", text)
        text = _STORED_KEY.sub(rf"\1{REDACTED}", text)
        return _BEARER.sub(rf"\1{REDACTED}", text)


# ------------------------------------------------------------------ formatters


class TextFormatter(logging.Formatter):
    """``2026-11-29 18:00:00,123 INFO app.worker: message request_id=... run_id=...``"""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = [
            f"{name}={value}" for name in ("request_id", "run_id") if (value := getattr(record, name, None)) is not None
        ]
        if context:
            head, newline, rest = line.partition("\n")  # after the message, before a traceback
            line = f"{head} {' '.join(context)}{newline}{rest}"
        return self.redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id,
    run_id, and ``http`` (access lines), ``last_error`` (failed runs) and
    ``exception`` (a traceback) when present."""

    EXTRA_FIELDS = ("http", "last_error", "status", "model")

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "run_id": getattr(record, "run_id", None),
        }
        for name in self.EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return self.redact(json.dumps(entry, ensure_ascii=False, default=str))


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


# --------------------------------------------------------------- configuration


def build_handler(log_format: LogFormat, api_keys: Sequence[str] = (), stream: TextIO | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    redact = Redactor(api_keys)
    handler.setFormatter(JsonFormatter(redact) if log_format == "json" else TextFormatter(redact))
    handler.addFilter(ContextFilter())
    return handler


def configure(level: int, log_format: LogFormat, api_keys: Sequence[str] = ()) -> None:
    """Route every logger of the process through one handler on the root
    logger. uvicorn is started with ``log_config=None`` so that it adds no
    handlers of its own: its loggers propagate here. Its access log is off;
    app/observability/http.py writes a compact, redacted one instead."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(build_handler(log_format, api_keys))
    root.setLevel(level)
    logging.captureWarnings(True)  # Python warnings too, in the same format (logger py.warnings)
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    adopt_litellm_loggers()


def adopt_litellm_loggers() -> None:
    """Drop the handlers litellm adds to its loggers at import, so its lines
    print once, through ours. Called again right after litellm is imported
    (app/llm/litellm_adapter.py), since that may happen after configure()."""
    for name in LITELLM_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(max(logger.level, logging.WARNING))
