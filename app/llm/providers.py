"""Provider shapes for the direct adapter: which routes speak OpenAI's chat
completions as they are, and where and with which credentials a request goes.

routing.py asks ``refusal`` whether a route can be served directly;
direct.py asks ``endpoint`` for the URL and headers of each call. Everything
here is read off litellm 1.100's own provider configuration (its defaults,
environment variable names and the translations it applies), so that a route
served directly sends what litellm would have sent:

- ``openai/`` and ``hosted_vllm/`` with an ``api_base`` (OpenAI's o-series
  and gpt-5 names excepted: litellm reshapes their requests);
- providers litellm routes to a fixed OpenAI-compatible base URL with no
  translation of our requests (``PLAIN``): ``api_base`` is optional there,
  and the key falls back to the provider's variable, then ``OPENAI_API_KEY``
  (as litellm's openai client does);
- ``azure/<deployment>``: Azure OpenAI's deployment URL with ``api-version``
  and the ``api-key`` header (or ``Authorization: Bearer`` for an
  ``azure_ad_token``). The deployments litellm translates for (o-series and
  gpt-5 request shapes, gpt-3.5's JSON mode, API versions before 2024-08),
  Entra ID sign-in and Cloudflare's gateway stay on litellm.

Providers litellm does translate for stay on litellm; bench/README.md
(branch ``routes``) lists them and why. ``anthropic/`` is the exception:
anthropic_request.py judges its routes and builds what litellm sends.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from app.llm import anthropic_request, model_map


@dataclass(frozen=True)
class Shape:
    """One provider prefix served over OpenAI's chat completions as they are."""

    prefix: str
    # Environment variables for the key, tried in order after ``api_key``.
    key_variables: tuple[str, ...]
    # Where the base URL comes from without ``api_base``; None: it must be given.
    base_variable: str | None = None
    default_base: str | None = None
    # litellm sends a route's max_completion_tokens as max_tokens (its
    # OpenAI-like providers only know the older name), over the request's own
    # max_tokens: such a route stays on litellm.
    max_tokens_only: bool = False
    # The route's ``organization`` parameter: litellm sends it (as the
    # OpenAI-Organization header) for openai/ only; elsewhere it needs litellm.
    organization: bool = False
    # litellm's openai client sends OPENAI_ORGANIZATION as that header when the
    # route names no organization (the openai SDK it builds then reads
    # OPENAI_ORG_ID), and OPENAI_PROJECT_ID as the OpenAI-Project header (it
    # passes no project): for openai/ and the plain providers, not for
    # hosted_vllm/ (Azure's client reads only the SDK's two variables).
    organization_variable: bool = True
    # Route parameters litellm's drop_params leaves out of this provider's
    # requests (always, or for most model names): such a route stays on litellm.
    dropped: frozenset[str] = frozenset()


def _plain(name: str, keys: tuple[str, ...], base: str, base_variable: str, *, max_tokens_only: bool = True) -> Shape:
    # litellm's openai client reads OPENAI_API_KEY when the provider's own variables are unset.
    return Shape(f"{name}/", (*keys, "OPENAI_API_KEY"), base_variable, base, max_tokens_only, dropped=_DROPPED)


# metadata is litellm's own (its callbacks'), never sent. On openai/, user and
# reasoning_effort are sent only for models its model map says take them (a
# local server's names mostly are not there); hosted_vllm/ drops user; the
# plain providers' parameter lists have none of the three.
_DROPPED = frozenset({"user", "reasoning_effort", "metadata"})

# Served with an api_base only (their defaults point at api.openai.com or a
# local server: what the routing file names is what is meant).
OPENAI = Shape("openai/", ("OPENAI_API_KEY",), organization=True, dropped=_DROPPED)
HOSTED_VLLM = Shape(
    "hosted_vllm/", ("HOSTED_VLLM_API_KEY",), organization_variable=False, dropped=frozenset({"user", "metadata"})
)

# litellm's OpenAI-compatible providers whose configuration changes nothing in
# the requests this server makes (tools, tool_choice, parallel_tool_calls,
# response_format, sampling parameters, stream_options; text, image and tool
# messages) nor in the streamed chunks. The others translate: groq (JSON mode
# through a tool, without streaming), deepseek and moonshot (messages
# flattened, thinking), mistral, fireworks_ai (model names, tools),
# together_ai (drops tools per model, reasoning), xai (reasoning models'
# parameters, usage), perplexity, deepinfra, cerebras, sambanova, hyperbolic,
# nvidia_nim (drop tools or stream_options), openrouter (adds usage and cache
# controls), meta_llama (drops response_format), and more.
PLAIN = (
    _plain("nebius", ("NEBIUS_API_KEY",), "https://api.studio.nebius.ai/v1", "NEBIUS_API_BASE"),
    _plain("novita", ("NOVITA_API_KEY",), "https://api.novita.ai/v3/openai", "NOVITA_API_BASE", max_tokens_only=False),
    _plain("wandb", ("WANDB_API_KEY",), "https://api.inference.wandb.ai/v1", "WANDB_API_BASE"),
    _plain("lambda_ai", ("LAMBDA_API_KEY",), "https://api.lambda.ai/v1", "LAMBDA_API_BASE"),
    _plain("github", ("GITHUB_API_KEY",), "https://models.inference.ai.azure.com", "GITHUB_API_BASE"),
    _plain("galadriel", ("GALADRIEL_API_KEY",), "https://api.galadriel.com/v1", "GALADRIEL_API_BASE"),
    _plain("friendliai", ("FRIENDLIAI_API_KEY", "FRIENDLI_TOKEN"), "https://api.friendli.ai/serverless/v1",
           "FRIENDLI_API_BASE"),
    _plain("empower", ("EMPOWER_API_KEY",), "https://app.empower.dev/api/v1", "EMPOWER_API_BASE"),
)  # fmt: skip
_SHAPES = {shape.prefix: shape for shape in (OPENAI, HOSTED_VLLM, *PLAIN)}

AZURE_PREFIX = "azure/"
# litellm.AZURE_DEFAULT_API_VERSION in litellm 1.100 (litellm moves it to its latest).
AZURE_DEFAULT_API_VERSION = "2025-02-01-preview"
# Versions served by Azure's OpenAI-style v1 surface: /openai/v1, Bearer auth, no api-version.
_AZURE_V1_VERSIONS = frozenset({"preview", "latest", "v1"})
# Deployment names litellm sends through other request shapes (its o-series
# and gpt-5 configurations rename max_tokens and drop sampling parameters;
# gpt-3.5 gets JSON mode as a tool): they stay on litellm.
_AZURE_TRANSLATED_NAMES = ("o1", "o3", "o4", "o_series/", "gpt-5", "gpt-6", "gpt5_series", "gpt-3.5", "gpt-35")
_DIGIT_DASH_DIGIT = re.compile(r"(\d)-(\d)")
# OpenAI model names litellm reshapes requests for: its o-series (an "o<digit>"
# name among its OpenAI models, which its model map lists) and gpt-5 (a marker
# anywhere in the name, gpt-5-chat excepted).
_OPENAI_REASONING_MARKERS = ("gpt-5", "gpt-6")
# litellm 1.100's o-series names, for when litellm (and so its map) is not
# installed: such a name then fails with "needs litellm" rather than going
# direct with the parameters OpenAI refuses for it.
_OPENAI_O_SERIES_1_100 = frozenset(
    {"o1", "o1-2024-12-17", "o1-pro", "o1-pro-2025-03-19", "o3", "o3-2025-04-16", "o3-deep-research"}
    | {"o3-deep-research-2025-06-26", "o3-mini", "o3-mini-2025-01-31", "o3-pro", "o3-pro-2025-06-10", "o4-mini"}
    | {"o4-mini-2025-04-16", "o4-mini-deep-research", "o4-mini-deep-research-2025-06-26"}
)
# Before this version litellm rewrites response_format (as a tool) and may drop tool_choice.
_AZURE_PLAIN_SINCE = (2024, 8)
_DATED_VERSION = re.compile(r"(\d{4})-(\d{2})-\d{2}")

# Route parameters every direct route understands.
CONNECTION_KEYS = frozenset(
    {"model", "api_base", "api_key", "timeout", "max_retries", "extra_headers", "extra_body"}
    # meaningful to litellm only: every parameter is sent on the direct path
    | {"drop_params", "allowed_openai_params"}
)
AZURE_CONNECTION_KEYS = frozenset({"api_version", "azure_ad_token"})
# Route parameters sent as OpenAI request parameters (the route's defaults).
BODY_KEYS = frozenset(
    {"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "presence_penalty"}
    | {"frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "user", "response_format"}
    | {"reasoning_effort", "parallel_tool_calls", "tool_choice", "service_tier", "metadata", "store"}
)
# Not among litellm's Azure parameters: with drop_params it would leave them out.
_AZURE_UNSUPPORTED_BODY_KEYS = frozenset({"reasoning_effort", "service_tier", "metadata"})


@dataclass(frozen=True)
class Endpoint:
    """Where one call goes: the URL (with its query), the credential headers,
    and the model name the body carries."""

    url: str
    headers: Mapping[str, str]
    model: str


def direct_prefixes() -> tuple[str, ...]:
    return (*_SHAPES, AZURE_PREFIX, anthropic_request.PREFIX)


def refusal(params: Mapping[str, Any], extra_keys: frozenset[str] = frozenset()) -> str | None:
    """Why these litellm_params cannot be served directly; None if they can.

    ``extra_keys`` are route parameters the caller handles itself (the
    proxy's routing keys). Azure's choice reads the environment litellm would
    read (at start-up: it names the credentials and the API version). A base
    URL with a query string is not judged here: Entry.parse refuses the
    entry before (``base_with_query``)."""
    target = str(params.get("model", ""))
    known = CONNECTION_KEYS | BODY_KEYS | extra_keys
    if target.startswith(AZURE_PREFIX):
        return _azure_refusal(target[len(AZURE_PREFIX) :], params, known)
    if target.startswith(anthropic_request.PREFIX):  # Anthropic's Messages API (anthropic_messages.py)
        return anthropic_request.route_refusal(params, extra_keys)
    shape = _shape(target)
    if shape is None:
        names = ", ".join(prefix + "..." for prefix in direct_prefixes())
        return f"{target} is not a model the direct path serves ({names})"
    if shape.default_base is None and not params.get("api_base"):
        return "it has no api_base"
    unknown = sorted(set(params) - known - ({"organization"} if shape.organization else set()))
    if unknown:
        return f"litellm_params {', '.join(unknown)} need litellm"
    dropped = sorted(shape.dropped & set(params))
    if dropped:
        return f"litellm leaves {', '.join(dropped)} out for {shape.prefix}"
    translated = name_translated(target)
    if translated:
        return translated
    if shape.max_tokens_only and "max_completion_tokens" in params:
        return f"litellm sends max_completion_tokens as max_tokens for {shape.prefix}"
    return None


def _azure_refusal(deployment: str, params: Mapping[str, Any], known: frozenset[str]) -> str | None:
    unknown = sorted(set(params) - known - AZURE_CONNECTION_KEYS)
    if unknown:
        return f"litellm_params {', '.join(unknown)} need litellm"
    unsupported = sorted(_AZURE_UNSUPPORTED_BODY_KEYS & set(params))
    if unsupported:
        return f"litellm leaves {', '.join(unsupported)} out for Azure"
    translated = name_translated(AZURE_PREFIX + deployment)
    if translated:
        return translated
    base = params.get("api_base") or os.environ.get("AZURE_API_BASE")
    if not base:
        return "it has no api_base (nor AZURE_API_BASE)"
    if "gateway.ai.cloudflare.com" in str(base):
        return "Cloudflare's AI gateway is litellm's"
    version = str(_at_start_up(params.get("api_version")) or os.environ.get("AZURE_API_VERSION") or "")
    dated = _DATED_VERSION.match(version)
    if dated and (int(dated.group(1)), int(dated.group(2))) < _AZURE_PLAIN_SINCE:
        return f"litellm translates response_format and tool_choice for api_version {version}"
    token = _at_start_up(params.get("azure_ad_token"))
    environment_key = _azure_environment_key()
    if params.get("api_key") and token:
        return "api_key and azure_ad_token are both set"
    if token and environment_key:
        return "azure_ad_token and a key variable are both set"  # litellm refuses the pair
    if isinstance(token, str) and token.startswith("oidc/"):
        return "OIDC tokens are litellm's"
    if not (params.get("api_key") or token or environment_key):
        return "no api_key, azure_ad_token or key variable (Entra ID sign-in is litellm's)"
    return None


def base_with_query(params: Mapping[str, Any]) -> bool:
    """Whether the base URL (as start-up reads it) of an OpenAI-compatible
    route has a query string (a fragment is dropped). Both paths append the endpoint's
    path to the base, which a query swallows (``...?key=x/chat/completions``):
    such a route is refused at start-up."""
    target = str(params.get("model", ""))
    if target.startswith(AZURE_PREFIX):
        base = _at_start_up(params.get("api_base")) or os.environ.get("AZURE_API_BASE")
    else:
        shape = _shape(target)
        if shape is None:
            return False
        base = _at_start_up(params.get("api_base")) or (shape.base_variable and os.environ.get(shape.base_variable))
    return _has_query(base)


def name_translated(target: str) -> str | None:
    """Why litellm sends a request for this model through another shape, by its
    name alone; None if it does not. Checked at start-up for an entry's target
    and per request for what a wildcard fills in (``azure/*`` asked for
    ``o3-mini``), since litellm decides by the name it is given."""
    if target.startswith(AZURE_PREFIX):
        deployment = target[len(AZURE_PREFIX) :]
        # litellm reads gpt-3-5-turbo as gpt-3.5-turbo (digit-dash-digit as a dot) for its gpt-3.5 check.
        dotted = _DIGIT_DASH_DIGIT.sub(r"\1.\2", deployment)
        if any(name in deployment for name in _AZURE_TRANSLATED_NAMES) or "gpt-3.5" in dotted:
            return f"litellm translates requests for the Azure deployment {deployment}"
    elif target.startswith(OPENAI.prefix):
        # litellm's OpenAI o-series and gpt-5 configurations: max_completion_tokens,
        # system messages and sampling parameters reshaped.
        name = target[len(OPENAI.prefix) :]
        last = name.rsplit("/", 1)[-1]
        if _openai_o_series(last) or (
            any(marker in name for marker in _OPENAI_REASONING_MARKERS) and not last.startswith("gpt-5-chat")
        ):
            return f"litellm translates requests for OpenAI's {last}"
    return None


def _openai_o_series(name: str) -> bool:
    """litellm's o-series rule: "o<digit>..." and one of its OpenAI models, so a
    local ``o3-mini-distill`` behind ``openai/*`` is not one."""
    if not (len(name) > 1 and name[0] == "o" and name[1].isdigit()):
        return False
    if not model_map.available():
        return name in _OPENAI_O_SERIES_1_100
    info = model_map.entry(name)
    return info is not None and info.get("litellm_provider") == "openai"


def endpoint(target: str, params: Mapping[str, Any]) -> Endpoint:
    """The URL and credential headers of a call, from resolved litellm_params."""
    if target.startswith(AZURE_PREFIX):
        return _azure_endpoint(target[len(AZURE_PREFIX) :], params)
    shape = _shape(target)
    if shape is None:  # routing.py only marks routes direct when refusal() is None
        raise ValueError(f"{target} is not served directly")
    base = params.get("api_base") or (shape.base_variable and os.environ.get(shape.base_variable))
    base = base or shape.default_base
    if not base:
        raise ValueError("it has no api_base")
    if _has_query(base):
        raise ValueError(_QUERY_REFUSAL)
    base = _without_fragment(str(base))
    headers: dict[str, str] = {}
    key = params.get("api_key") or next(filter(None, map(os.environ.get, shape.key_variables)), None)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    organization = shape.organization and params.get("organization")
    if shape.organization_variable:
        # litellm's own variable first, else what the openai SDK under it reads.
        headers.update(_sdk_environment_headers())
        organization = organization or os.environ.get("OPENAI_ORGANIZATION")
    if organization:
        headers["OpenAI-Organization"] = str(organization)
    model = target[len(shape.prefix) :]
    return Endpoint(str(base).rstrip("/") + "/chat/completions", headers, model)


def _azure_endpoint(deployment: str, params: Mapping[str, Any]) -> Endpoint:
    base = _without_fragment(str(params.get("api_base") or os.environ.get("AZURE_API_BASE") or "")).rstrip("/")
    if not base:
        raise ValueError("no api_base and AZURE_API_BASE is not set")
    if _has_query(base):
        raise ValueError(_QUERY_REFUSAL)
    version = str(params.get("api_version") or os.environ.get("AZURE_API_VERSION") or AZURE_DEFAULT_API_VERSION)
    key = params.get("api_key") or _azure_environment_key()
    token = params.get("azure_ad_token")
    if version in _AZURE_V1_VERSIONS:  # the OpenAI client on Azure's v1 surface
        credential = key or token
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        return Endpoint(f"{base}/openai/v1/chat/completions", {**headers, **_sdk_environment_headers()}, deployment)
    headers = {"api-key": str(key)} if key else ({"Authorization": f"Bearer {token}"} if token else {})
    headers.update(_sdk_environment_headers())
    # An api_base that already names a deployment is used as it is (as the openai SDK does).
    path = "" if "/openai/deployments" in base else f"/openai/deployments/{quote(deployment, safe='')}"
    url = f"{base}{path}/chat/completions?{urlencode({'api-version': version})}"
    return Endpoint(url, headers, deployment)


def _sdk_environment_headers() -> dict[str, str]:
    """What the openai SDK's clients under litellm (its OpenAI and
    OpenAI-compatible providers' as well as its Azure one) read from the
    environment themselves: litellm passes them no organization nor project."""
    headers = {}
    if os.environ.get("OPENAI_ORG_ID"):
        headers["OpenAI-Organization"] = os.environ["OPENAI_ORG_ID"]
    if os.environ.get("OPENAI_PROJECT_ID"):
        headers["OpenAI-Project"] = os.environ["OPENAI_PROJECT_ID"]
    return headers


def _shape(target: str) -> Shape | None:
    prefix = target.partition("/")[0] + "/"
    return _SHAPES.get(prefix) if "/" in target else None


# The path is appended to the base URL: a query there swallows it
# (``...?key=x/chat/completions``), on our path and litellm's alike.
_QUERY_REFUSAL = "its api_base has a query string, which the endpoint's path would be appended to"


def _has_query(base: Any) -> bool:
    return isinstance(base, str) and "?" in base


def _without_fragment(base: str) -> str:
    # A fragment is never sent (httpx, under litellm, drops it): an entry
    # whose base has one worked through litellm and is served the same here.
    return base.partition("#")[0]


def _azure_environment_key() -> str | None:
    return os.environ.get("AZURE_OPENAI_API_KEY") or os.environ.get("AZURE_API_KEY")


def _at_start_up(value: Any) -> Any:
    """An ``os.environ/NAME`` value as the environment has it now (None if unset)."""
    if isinstance(value, str) and value.startswith("os.environ/"):
        return os.environ.get(value[len("os.environ/") :])
    return value
