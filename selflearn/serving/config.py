"""Typed configuration of the serving tier: the model's `user_config`, the app's args, request bodies.

Three layers, each validated with pydantic and each rejecting unknown keys so a typo is an error,
never a silent default:

* `ModelConfig` is the ChatModel deployment's `user_config` (what the operator or `selflearn local`
  changes to roll onto a checkpoint). A bad one never crashes a replica: it is recorded as a failed
  swap and the replica keeps serving the weights it has.
* `ServeSettings` are the application's build args (`app_builder(args)`): limits, security, replicas.
* The request models are built per settings (`request_models`) so that configurable caps (message
  length, new-token cap) show up both in validation and in the OpenAPI schema.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..contracts import CHECKPOINT_URI_RE
from ..feedback import Correction
from ..spec import EMBEDDED_MODEL, MemoryUseSpec
from ..validation import field_path, one_line

CONVERSATION_ID_RE = r"^[A-Za-z0-9_.:-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def format_errors(err: ValidationError) -> str:
    """`temperature: Input should be less than or equal to 2; message: ...` (one line)."""
    return one_line(err.errors(), lambda e: field_path(e, skip=("body",)))


# -- ChatModel user_config ---------------------------------------------------------------------------
class GenerationDefaults(_Strict):
    """Defaults for requests that leave a parameter out. `max_length` counts *new* tokens."""

    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=0, le=100_000)  # as a request's: a value past int64 failed every batch
    max_length: int = Field(128, ge=1)
    repetition_penalty: float = Field(1.1, gt=0, le=10)
    stop: list[str] = Field(default_factory=list, max_length=8)


class ModelConfig(_Strict):
    """The ChatModel deployment's `user_config`; `reconfigure()` hot-swaps onto it."""

    model_config = ConfigDict(extra="forbid", strict=False)  # YAML/JSON from operators: lax scalars

    checkpoint: str | None = None
    base_model: str = EMBEDDED_MODEL
    storage_endpoint: str | None = None
    storage_region: str | None = None
    # What decodes: OpenVINO GenAI's continuous batching (a CPU, a Llama-family model, openvino
    # installed), the torch engine, or `auto`: openvino where it can run, else torch.
    engine: Literal["auto", "torch", "openvino"] = "auto"
    # Weights quantised at load, on the OpenVINO engine (openvino_ir.QUANTIZATIONS names each scheme).
    quantization: Literal["none", "int8", "q4"] = "none"
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)
    memory: MemoryUseSpec = Field(default_factory=MemoryUseSpec)  # changed in place, no reload

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip().rstrip("/")
        if not CHECKPOINT_URI_RE.match(v):
            raise ValueError(f"{v!r} is not a checkpoint uri: expected file:///path/<run>/r000007 or "
                             "s3://bucket/prefix/<run>/r000007")
        return v

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("base_model must not be empty")
        return v

    @property
    def weights_key(self) -> tuple:
        """What identifies the weights: a change here means a reload, anything else does not."""
        return (self.checkpoint, self.base_model if self.checkpoint is None else None,
                self.storage_endpoint, self.storage_region, self.engine, self.quantization)


def parse_model_config(raw: Any) -> ModelConfig:
    """Validate a user_config; ValueError with a one-line message when it is bad."""
    if raw is None:
        return ModelConfig()
    if not isinstance(raw, dict):
        raise ValueError(f"user_config must be a mapping, got {type(raw).__name__}")
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"invalid user_config: {format_errors(err)}") from None


# -- application args --------------------------------------------------------------------------------
class EngineOptions(_Strict):
    """How the ChatModel replica runs its model (constructor args, not hot-swappable)."""

    model_config = ConfigDict(extra="forbid", strict=False)

    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    torch_threads: int | None = Field(None, ge=1, le=256)
    max_batch_size: int = Field(16, ge=1, le=256)
    max_queue: int = Field(64, ge=1, le=100_000)
    max_context_tokens: int = Field(2048, ge=64)
    max_new_tokens_cap: int = Field(512, ge=1)
    cache_dir: str | None = None
    # A replica whose configured weights fail to load and that has nothing loaded serves the base
    # model (then the embedded one) and says it is degraded. Off: it stays unready instead, so a
    # bad checkpoint never passes for the promoted one (`selflearn serve --allow-degraded` sets it).
    allow_base_fallback: bool = False


class ServeSettings(_Strict):
    """`app_builder(args)`: every key is optional. See docs/serving.md for each one."""

    model_config = ConfigDict(extra="forbid", strict=False)

    # Initial ChatModel user_config (a RayService's deployments[].user_config overrides it). The
    # shorthands `checkpoint`/`base_model` seed it too; `storage_*` also reach the feedback store.
    user_config: dict[str, Any] | None = None
    checkpoint: str | None = None
    base_model: str | None = None
    storage_endpoint: str | None = None
    storage_region: str | None = None
    engine: EngineOptions = Field(default_factory=EngineOptions)
    model_replicas: int = Field(1, ge=1, le=64)
    ingress_replicas: int = Field(1, ge=1, le=64)
    model_num_cpus: float = Field(0, ge=0)
    # Security and limits.
    api_key: str | None = None
    # None: SELFLEARN_API_KEY if it is set. A variable named here must hold the key (see `api_key_of`).
    api_key_env: str | None = None
    rate_limit_per_minute: float = Field(0, ge=0)  # 0: off
    rate_limit_burst: int | None = Field(None, ge=1)
    # Who the client is: the connection's peer, unless the peer is one of `trusted_proxies` (IPs or
    # CIDRs): then the nearest untrusted address in its X-Forwarded-For. `trust_forwarded_for` believes
    # the header from every peer (only right behind a proxy that overwrites it; kept for compatibility).
    trust_forwarded_for: bool = False
    trusted_proxies: list[str] = Field(default_factory=list)
    max_message_chars: int = Field(4000, ge=1, le=1_000_000)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_inflight: int = Field(64, ge=1)
    request_timeout_s: float = Field(120, gt=0)
    cors_origins: list[str] = Field(default_factory=list)
    safety_filter: str | None = None  # "module:factory" returning a SafetyFilter
    blocklist: list[str] = Field(default_factory=list)
    # Conversation memory (per ingress replica).
    history_turns: int = Field(8, ge=0, le=1000)
    max_conversations: int = Field(10_000, ge=1)
    # Durable feedback: a file:// or s3:// prefix.
    feedback_uri: str | None = None
    # The secret that signs response ids, so that any ingress replica can check an answer a
    # client sends back with its feedback (one replica's memory does not reach another's). The
    # variable (a Kubernetes Secret) wins; unset, the feedback store keeps a random one that every
    # replica and restart shares. Never derived from anything a client can see.
    feedback_secret_env: str = "SELFLEARN_FEEDBACK_SECRET"
    # /feedback's own limits (docs/serving.md, "POST /feedback"), apart from chat's. Rates per
    # minute (0: off); the daily caps count per ingress replica, per UTC day.
    feedback_rate_limit_per_minute: float = Field(30, ge=0)  # per client address
    feedback_rate_limit_burst: int | None = Field(10, ge=1)
    feedback_key_rate_limit_per_minute: float = Field(300, ge=0)  # per API key, when one is required
    feedback_max_items_per_client_per_day: int = Field(100, ge=1)
    feedback_max_bytes_per_day: int = Field(64 * 1024 * 1024, ge=64 * 1024)
    feedback_retention_days: int = Field(30, ge=0)  # days of feedback kept in the store; 0: all
    # The one-machine driver's pages: its dashboard (static files) and its run state (a JSON file).
    dashboard_dir: str | None = None
    state_file: str | None = None

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        out = []
        for item in v:
            try:
                out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network (e.g. 10.0.0.0/8 or "
                                 "192.168.1.7)") from None
        return out

    @model_validator(mode="after")
    def _check(self) -> "ServeSettings":
        if self.feedback_uri and not self.feedback_uri.startswith(("file://", "s3://")):
            raise ValueError("feedback_uri must start with file:// or s3://")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; give the key, or leave api_key out to run with auth off")
        if self.api_key_env is not None and not self.api_key_env.strip():
            raise ValueError("api_key_env is empty; name the environment variable that holds the API key")
        if self.safety_filter and ":" not in self.safety_filter:
            raise ValueError(f"safety_filter must be an import path 'module:attribute', got {self.safety_filter!r}")
        return self


DEFAULT_API_KEY_ENV = "SELFLEARN_API_KEY"


def api_key_of(settings: ServeSettings, environ: Mapping[str, str], *, option: str = "api_key_env") -> str | None:
    """The API key the settings ask for (None: auth off). ValueError naming the variable when one is
    named but holds no key, so a missing Secret never turns authentication off in silence.

    `api_key` wins; else the variable `api_key_env` names, which must be set and not blank; else
    SELFLEARN_API_KEY when it is set (set but blank is refused the same way). `option` is how the
    user named the variable, for the message (`--api-key-env` on the command line)."""
    if settings.api_key:
        return settings.api_key
    named = settings.api_key_env
    var = named or DEFAULT_API_KEY_ENV
    value = environ.get(var)
    if value is not None and value.strip():
        return value.strip()  # a key read from a file often ends in a newline no client sends
    if value is None and named is None:
        return None  # nothing configured: auth off, and the start-up line says so
    if named is None:
        raise ValueError(f"{var} is set but empty: set it to the API key, or unset it to run with auth off")
    state = "not set" if value is None else "empty"
    raise ValueError(f"{option} {var}: the variable {var} is {state}; set it to the API key, or leave "
                     f"{option} out to run with auth off")


def initial_user_config(settings: ServeSettings) -> dict[str, Any]:
    """The shorthand args, overridden by `args.user_config`."""
    seed = {k: getattr(settings, k) for k in ("checkpoint", "base_model", "storage_endpoint", "storage_region")
            if getattr(settings, k) is not None}
    return {**seed, **(settings.user_config or {})}


def parse_settings(args: dict[str, Any] | None) -> ServeSettings:
    try:
        return ServeSettings.model_validate(args or {})
    except ValidationError as err:
        raise ValueError(f"invalid serve args: {format_errors(err)}") from None


# -- request bodies ----------------------------------------------------------------------------------
def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty or only whitespace")
    return v


# The longest reply, in characters, that `max_new_tokens_cap` tokens can decode to: a generous
# bound (an English token is about 4 characters; only runs of spaces or symbols reach 32).
REPLY_CHARS_PER_TOKEN = 32


def feedback_request(max_prompt_chars: int, max_reply_chars: int) -> type[BaseModel]:
    """POST /feedback's body: the prompt and reply it sends back are capped like an answer the
    server can have given (a message of chat's cap, a reply of the new-token cap)."""

    class FeedbackRequest(_Strict):
        rating: Literal["up", "down"]
        response_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
        conversation_id: str | None = Field(None, pattern=CONVERSATION_ID_RE)
        correction: Correction | None = None
        comment: str | None = Field(None, max_length=2_000)
        # The answer as the client received it, for a response this replica does not remember (the
        # response id signs them, so they are checked, not trusted).
        prompt: str | None = Field(None, max_length=max_prompt_chars)
        reply: str | None = Field(None, max_length=max_reply_chars)
        checkpoint: str | None = Field(None, max_length=2_000)

    return FeedbackRequest



class RequestModels:
    """Request body classes whose caps come from the settings."""

    def __init__(self, max_message_chars: int, max_new_tokens_cap: int):
        Message = Annotated[str, Field(min_length=1, max_length=max_message_chars)]
        NewTokens = Annotated[int, Field(ge=1, le=max_new_tokens_cap)]
        Stop = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=4)]

        class Sampling(_Strict):
            # Any value these admit is safe for the batch it joins, also those float32 turns into 0
            # or infinity (top_p 1e-300, temperature 1e-40): sampling.py says how each is handled.
            temperature: float | None = Field(None, ge=0, le=2)
            top_p: float | None = Field(None, gt=0, le=1)
            top_k: int | None = Field(None, ge=0, le=100_000)
            repetition_penalty: float | None = Field(None, gt=0, le=10)
            seed: int | None = Field(None, ge=0, le=2**63 - 1)
            # Read the checkpoint's memory of learned articles (None: the deployment's `memory.enabled`).
            memory: bool | None = None

        class ChatRequest(Sampling):
            """The seed's body, plus conversation memory and a few extras."""

            message: Message
            max_length: NewTokens | None = None
            conversation_id: str | None = Field(None, pattern=CONVERSATION_ID_RE)
            stop: Stop | None = None

            @field_validator("message")
            @classmethod
            def _blank(cls, v: str) -> str:
                return _not_blank(v)

        class TextPart(_Strict):
            type: Literal["text"]
            text: str

        class OpenAIMessage(_Strict):
            role: Literal["system", "user", "assistant", "developer"]
            content: Annotated[str, Field(max_length=max_message_chars)] | list[TextPart]
            name: str | None = None

            def text(self) -> str:
                return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

        class StreamOptions(_Strict):
            include_usage: bool = False

        class ChatCompletionRequest(Sampling):
            """OpenAI's chat completions body. Unsupported features are refused, not ignored."""

            model: str = Field(min_length=1, max_length=256)
            messages: list[OpenAIMessage] = Field(min_length=1, max_length=256)
            max_tokens: NewTokens | None = None
            max_completion_tokens: NewTokens | None = None
            stream: bool = False
            stream_options: StreamOptions | None = None
            stop: Annotated[str, Field(min_length=1, max_length=64)] | Stop | None = None
            n: Literal[1] = 1
            user: str | None = Field(None, max_length=256)
            presence_penalty: Literal[0] | None = None
            frequency_penalty: Literal[0] | None = None
            logprobs: Literal[False] | None = None

            @model_validator(mode="after")
            def _messages(self) -> "ChatCompletionRequest":
                total = sum(len(m.text()) for m in self.messages)
                if total > max_message_chars * 8:
                    raise ValueError(f"messages hold {total} characters, over the cap of {max_message_chars * 8}")
                last = self.messages[-1]
                if last.role != "user" or not last.text().strip():
                    raise ValueError("the last message must be a non-empty user message")
                return self

            def stops(self) -> list[str] | None:
                return [self.stop] if isinstance(self.stop, str) else self.stop

        self.ChatRequest = ChatRequest
        self.ChatCompletionRequest = ChatCompletionRequest
        self.FeedbackRequest = feedback_request(max_message_chars, max_new_tokens_cap * REPLY_CHARS_PER_TOKEN)
