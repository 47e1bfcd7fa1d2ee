"""OpenAI request and response bodies, plus loraplex's `adapter` field."""

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


# A completion is JSON, or server-sent events when `stream` is true.
STREAM_OR_JSON = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}


# Bounds on every request field, so no single body can make the gateway or engine do unbounded work.
MAX_NAME_CHARS = 256
MAX_TEXT_CHARS = 1 << 20
MAX_MESSAGES = 1024
MAX_PROMPTS = 64
MAX_PROMPT_TOKENS = 1 << 17
MAX_STOPS = 16
MAX_STOP_CHARS = 256
INT64 = 2**63 - 1
MAX_COMPOSED_SOURCES = 8
# OpenAI's bounds on `metadata`: 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=16)]
MAX_ADAPTER_WEIGHT = 10.0

Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


def non_finite_field(value: object, path: str = "") -> str | None:
    """The dotted path of the first NaN or infinite number in a JSON-like value, if any."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "body")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = non_finite_field(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


class StreamOptions(BaseModel):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ContentPart(BaseModel):
    """A text part of a chat message; the demo and bench models read text only."""

    type: Literal["text"]
    text: Text


class AdapterWeight(BaseModel):
    """One adapter of a composition requested per call, and its weight in the sum of their updates."""

    model_config = ConfigDict(extra="forbid")

    name: Name = Field(description='"name", "name@3" or "name@alias", of the caller\'s own adapters.')
    weight: float = Field(ge=-MAX_ADAPTER_WEIGHT, le=MAX_ADAPTER_WEIGHT, description="Rounded to two decimals.")


# Which form of `adapter` a body uses, chosen by the value's type so that an error names only that form's fault; the
# tags appear in pydantic's error locations, and the API's `param` leaves them out.
ADAPTER_FORMS = ("reference", "recipe")
Adapter = Annotated[
    Annotated[Name, Tag("reference")]
    | Annotated[Annotated[list[AdapterWeight], Field(min_length=1, max_length=MAX_COMPOSED_SOURCES)], Tag("recipe")],
    Discriminator(lambda value: "recipe" if isinstance(value, list) else "reference"),
]


class OpenAIRequest(BaseModel):
    # Sampling fields we do not model (vLLM's extensions among them) pass through to the engine.
    model_config = ConfigDict(extra="allow")

    model: Name | None = None
    adapter: Adapter | None = Field(None, description='Adapter to answer with: "name", "name@3" or "name@alias"; '
                                                      "or a list of {name, weight}, served as their exact weighted "
                                                      "composition.")
    max_tokens: int | None = Field(None, ge=1, le=INT64, description="At most the model's context length.")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: Name | None = None
    store: bool | None = Field(None, description="Whether to store the completion, as the tenant's data policy "
                                                 "allows: under capture opt-in only `true` is stored, under on all "
                                                 "but `false`.")
    metadata: Metadata | None = Field(None, description="Up to 16 pairs kept with a stored completion, for "
                                                        "filtering it (keys up to 64 characters, values 512).")


class CompletionRequest(OpenAIRequest):
    prompt: (Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)] | None = None
    name: Name | None = None

    @model_validator(mode="after")
    def _content_required(self):
        # OpenAI lets only an assistant message (one that calls tools) leave out its content.
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: required in a {self.role} message")
        return self


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64, description="At most the model's context length.")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    versions: list[int] | None = None
    aliases: dict[str, int] | None = None
    canaries: dict[str, dict] | None = Field(
        None, description="Aliases that send a share of their callers to another version: {alias: {version, weight}}."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
