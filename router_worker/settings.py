"""Settings, parsed once from `ROUTER_*` environment variables and passed down."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CONFIG = Path(__file__).parent / "defaults" / "routing.yaml"
DEFAULT_ARTIFACT = Path("artifacts") / "classifier"
DEFAULT_STATIC_MODEL = Path("models") / "static-minilm"

EngineName = Literal["keyword", "cpu", "vllm"]


class Settings(BaseSettings):
    """Every knob of the worker; `ROUTER_<FIELD>` in the environment sets it."""

    model_config = SettingsConfigDict(env_prefix="ROUTER_", frozen=True, extra="ignore")

    # --- connections -----------------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap host:port list")
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"), description="Redis URL (redis:// or rediss://)"
    )
    database_url: SecretStr = Field(
        SecretStr("postgresql://postgres@127.0.0.1:5432/postgres"),
        description="PostgreSQL URL for the sink (postgresql://user:pass@host:port/db)",
    )
    database_schema: str = Field("public", description="Postgres schema holding the tables")
    redis_prefix: str = Field("rw:", description="prefix of every Redis key this worker touches")
    topic_prefix: str = Field("", description="prefix prepended to every topic name (isolation)")

    # --- Kafka security (production) -----------------------------------------------------
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol (SASL_SSL for SASL over TLS)"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism when the protocol is SASL_*"
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name")
    kafka_sasl_password: SecretStr | None = Field(
        None, description="SASL password (a secret: never printed)"
    )
    kafka_ssl_cafile: Path | None = Field(
        None, description="CA bundle that signed the brokers' certificates (default: system CAs)"
    )

    # --- the app and its consumer groups ---------------------------------------------------
    app_id: str = Field(
        "router-worker",
        description="the route consumer group; the Faust app (outcome agent) is `<app_id>-outcome`",
    )
    topic_partitions: int = Field(4, ge=1, description="partitions of the routing topics")
    web_port: int = Field(6066, ge=0, le=65535, description="worker web port (metrics, health)")
    session_timeout_s: float = Field(
        2.0, gt=0, description="consumer session timeout; 2 s joins fast on the embedded broker"
    )
    heartbeat_interval_s: float = Field(0.5, gt=0, description="consumer heartbeat interval")
    commit_interval_s: float = Field(
        0.5, ge=0.05, description="how often acked offsets are committed (route agent and Faust; "
        "below 0.05 s Faust's commit-livelock check can run before its consumer has started)"
    )
    fetch_max_wait_ms: int = Field(
        5, ge=0, description="longest a fetch waits for data; the embedded broker does not wake "
        "waiting fetches when data arrives, so this bounds queue latency there (Kafka and "
        "Redpanda answer as soon as data arrives: there it only paces idle polls)"
    )
    outcome_fetch_max_wait_ms: int = Field(
        250, ge=0, description="fetch wait of the outcome agent's consumer: outcomes tolerate "
        "latency, and each short idle fetch costs the route agent CPU time"
    )
    max_inflight_batches: int = Field(
        4, ge=1, description="batches between fetch and commit (routing or awaiting broker acks)"
    )
    route_concurrency: int = Field(
        2, ge=1, le=16,
        description="micro-batches routed at the same time; their commits stay in fetch order",
    )

    # --- routing -----------------------------------------------------------------------------
    config: Path = Field(DEFAULT_CONFIG, description="path of the YAML routing config")
    topics_dir: Path | None = Field(
        None, description="topic definitions for `topics apply` (default: the repo's topics/)"
    )
    max_batch: int = Field(512, ge=1, description="largest micro-batch the route agent takes")
    max_wait_ms: float = Field(
        10.0, gt=0,
        description="longest a fetch waits for records; a batch is what came, up to max_batch",
    )
    classify_overlap_max: int = Field(
        64, ge=0, description="batches up to this size are classified while their Redis round "
        "trip is in flight, so their latency is the longer of the two, not the sum; larger "
        "batches wait for Redis and skip the classifier for cache hits and over-rate requests "
        "(0: never overlap)"
    )
    classify_inline_max: int = Field(
        512, ge=0, description="batches up to this size classify on the event loop instead of "
        "a thread (cpu and keyword engines; vllm and the encoder stage always use a thread): "
        "they hold the GIL anyway, and a thread hand-off costs up to the 5 ms switch interval; "
        "larger batches go to a thread so the loop never stalls much longer than ~30 ms"
    )
    max_prompt_bytes: int = Field(65536, ge=1, description="prompt text above this is too_large")
    engine: EngineName = Field("cpu", description="classifier engine: keyword, cpu or vllm")
    artifact: Path = Field(DEFAULT_ARTIFACT, description="classifier artifact directory")
    artifact_poll_s: float = Field(2.0, gt=0, description="how often a new artifact is looked for")
    static_model: Path = Field(
        DEFAULT_STATIC_MODEL, description="distilled static encoder built by `make model`"
    )
    encoder_stage: bool = Field(
        False, description="send low-confidence requests to the full MiniLM encoder (2nd stage)"
    )
    engine_threads: int = Field(1, ge=1, description="threads the CPU engine may use")
    vllm_model: Path | None = Field(None, description="encoder directory vLLM loads (gpu extra)")

    # --- sink ----------------------------------------------------------------------------------
    run_sink: bool = Field(True, description="run the Postgres sink inside the worker process")
    run_outcomes: bool = Field(
        True, description="run the outcome agent (health, performance, spend, experiments)"
    )
    sink_group: str = Field("router-worker-sink", description="consumer group of the sink agent")
    sink_max_batch: int = Field(1000, ge=1, description="largest batch of rows per write")
    sink_max_wait_ms: float = Field(
        50.0, gt=0, description="longest wait to fill a sink batch (also the sink consumer's "
        "fetch wait, when longer than ROUTER_FETCH_MAX_WAIT_MS)"
    )

    # --- logs ----------------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="lowest level logged; debug adds one line per decision"
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="json, console (pretty), or auto: json unless stderr is a terminal"
    )
    log_prompts: bool = Field(False, description="log prompt text (off: hash and length only)")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Settings from an explicit `ROUTER_*` mapping (a child process's environment, a test's
        isolation), never from this process's own environment."""
        prefix = "ROUTER_"
        fields = {k.removeprefix(prefix).lower(): v for k, v in env.items() if k.startswith(prefix)}
        return cls.model_validate(fields)

    @property
    def rebalance_timeout_s(self) -> float:
        """How long a group waits for members to rejoin: twice the session timeout, >= 4 s."""
        return max(self.session_timeout_s * 2, 4.0)

    def topic(self, name: str) -> str:
        """Full topic name with this deployment's prefix."""
        return f"{self.topic_prefix}{name}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
