"""A handle on a running server for tests: where it is, how to reset it,
how to script the offline model and read what the model was sent.

Plain ``urllib`` on purpose: no HTTP library or SDK version is imposed on the
project under test. ``openai_client()`` imports the project's own ``openai``.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]


class AdminError(RuntimeError):
    """The admin API refused a request (the message is the server's)."""


@dataclass
class AssistantsServer:
    base_url: str  # ends with /v1: what OpenAI(base_url=...) takes
    api_key: str
    admin_url: str | None = None  # None when the server has no admin API

    # ------------------------------------------------------------ clients

    def openai_client(self, **options: Any) -> Any:
        """An ``openai.OpenAI`` pointed at the server (the project's own SDK version)."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key, **options)

    def async_openai_client(self, **options: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, **options)

    # ------------------------------------------------------------ admin API

    def reset(self) -> None:
        """Forget every object, file and scripted rule."""
        self._admin("POST", "/reset")

    def script(
        self,
        respond: str | Mapping[str, Any] | None = None,
        *,
        rounds: Sequence[str | Mapping[str, Any]] | None = None,
        match: Mapping[str, Any] | None = None,
        assistant_id: str | None = None,
        model: str | None = None,
        message: str | None = None,
        thread_metadata: Mapping[str, str] | None = None,
        delay_ms: int = 0,
        times: int | None = None,
        first: bool = False,
    ) -> str:
        """Program the offline model; returns the rule's id. See docs/testing.md.

        ``respond`` is one answer (text, or ``{"text", "refusal", "tool_calls", "fail",
        ...}``); ``rounds`` is one answer per tool round. The match fields may
        be given as keywords or as ``match``.
        """
        conditions = dict(match or {})
        for key, value in (
            ("assistant_id", assistant_id),
            ("model", model),
            ("message", message),
            ("thread_metadata", thread_metadata),
        ):
            if value is not None:
                conditions[key] = value
        body: JSON = {"match": conditions, "delay_ms": delay_ms}
        if rounds is not None:
            body["rounds"] = list(rounds)
        else:
            body["respond"] = respond if respond is not None else ""
        if times is not None:
            body["times"] = times
        if first:
            body["first"] = True
        return str(self._admin("POST", "/offline/rules", body)["id"])

    def rules(self) -> list[JSON]:
        data: list[JSON] = self._admin("GET", "/offline/rules")["data"]
        return data

    def clear_rules(self) -> None:
        self._admin("DELETE", "/offline/rules")

    def model_requests(self, run_id: str | None = None) -> list[JSON]:
        """What the model was sent and answered for a run (oldest first)."""
        query = f"?run_id={urllib.parse.quote(run_id)}" if run_id else ""
        data: list[JSON] = self._admin("GET", f"/model_requests{query}")["data"]
        return data

    def replay_misses(self) -> list[str]:
        """Requests that had no recorded answer since the last call (replay mode)."""
        data: list[JSON] = self._admin("POST", "/llm/misses")["data"]
        return [str(miss["message"]) for miss in data]

    def _admin(self, method: str, path: str, body: JSON | None = None) -> JSON:
        if self.admin_url is None:
            raise AdminError("this server has no admin API (serve --ephemeral or ASSISTANTS_ADMIN_API=true has one)")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 (an http URL we were given)
            self.admin_url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                answer: JSON = json.loads(response.read() or b"{}")
                return answer
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                detail = json.loads(detail)["error"]["message"]
            raise AdminError(f"{method} {path}: {exc.code} {detail}") from None
