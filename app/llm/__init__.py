"""Chat models: routing, the provider adapters and the built-in offline model.

- interface.py: ChatRequest, the streamed events, Exchange, LLMError;
- routing.py: the one reader of the routing file;
- facade.py: ``LLM``, through which every completion goes;
- provider.py: what the provider adapters share (chunk reading, error mapping);
- direct.py: OpenAI-compatible routes over our own HTTP request (no litellm);
- providers.py: which providers that is (openai/, hosted_vllm/, azure/, ...), their URLs and keys;
- anthropic_request.py, anthropic_messages.py: anthropic/ routes over Anthropic's Messages API (no litellm);
- litellm_adapter.py: any other provider through litellm, the only module importing it (lazily);
- model_map.py: litellm's bundled model map read as data (context windows, OpenAI's o-series);
- tokens.py: token estimates and cl100k_base decoding, without litellm;
- offline.py: the built-in offline model.

Routing reads a LiteLLM-proxy-style config (YAML or JSON)::

    model_list:
      - model_name: gpt-4o                   # exact names win over wildcards
        litellm_params: {model: openai/gpt-4o, api_key: os.environ/OPENAI_API_KEY}
        model_info: {max_input_tokens: 128000}
      - model_name: "claude-*"               # the most specific wildcard wins
        litellm_params: {model: "anthropic/claude-*"}
      - model_name: "*"                      # `*` in the target takes what `*` matched
        litellm_params: {model: "offline/*"} # offline/... is the built-in model
    offline:
      rules: rules.yaml                      # optional: see docs/offline-model.md

With no config file, or a config without ``model_list``, every model name is
served by the offline model. Otherwise a name no entry matches fails with
``invalid_prompt``. ``os.environ/NAME`` values are resolved at call time.
Unlike the proxy, duplicate names are not load-balanced: the first one wins.
Other litellm_params go to the provider as they are (litellm_adapter.py).

The offline model is deterministic and instant. Test authors steer it with
``[[directives]]`` in the last user message (or, if that has none, in the
system instructions; then in the config's rules). The full cue language is
in docs/offline-model.md; in short::

    [[reply TEXT]]           answer exactly TEXT
    [[tokens N]]             answer N filler words (one word = one token)
    [[call NAME {json}]]     call a function tool (several = parallel calls)
    [[then]]                 start the script for the next tool round
    [[json]]                 answer JSON even without response_format
    [[fail KIND]]            raise LLMError (rate_limit | server_error | invalid_prompt)
    [[fail KIND after N]]    ... after N deltas (alias: [[fail_after N KIND]])
    [[finish REASON]]        end with stop | length | content_filter
    [[delay MS]]             pause MS milliseconds before each delta
    [[hang]]                 never finish (until the consumer cancels)

A ```python fenced block in a last user message without directives calls
``code_interpreter`` with that code when the request offers it; offered
``file_search`` and given no directives, it searches with the user's text.

Without directives it answers ``You said: <last user text>``, or after tool
results ``Tool results: name -> output; ...``.
"""

from app.llm.facade import DEFAULT_CONTEXT_WINDOW, LLM
from app.llm.interface import (
    CallObserver,
    ChatRequest,
    ErrorCode,
    Event,
    Exchange,
    Finish,
    FinishReason,
    LLMConfigError,
    LLMError,
    RefusalDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
    chat_body,
    explicit_params,
)
from app.llm.litellm_adapter import embed
from app.llm.routing import Route
from app.llm.tokens import decode as decode_tokens

__all__ = [
    "DEFAULT_CONTEXT_WINDOW",
    "LLM",
    "CallObserver",
    "ChatRequest",
    "ErrorCode",
    "Event",
    "Exchange",
    "Finish",
    "FinishReason",
    "LLMConfigError",
    "LLMError",
    "RefusalDelta",
    "Route",
    "TextDelta",
    "ToolCallDelta",
    "Usage",
    "chat_body",
    "decode_tokens",
    "embed",
    "explicit_params",
]
