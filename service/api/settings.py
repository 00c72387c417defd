"""The server's configuration: one pydantic-settings model read from TAPESERVE_* variables."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.limits import Limits, input_elements_for

if TYPE_CHECKING:
    from service.workers import PoolConfig

__all__ = ["LIMIT_FIELDS", "Settings"]

_DEFAULT_LIMITS = Limits()
LIMIT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Limits))


class Settings(BaseSettings):
    """Every setting of the server; environment variables are the field names prefixed with TAPESERVE_."""

    # env_ignore_empty: TAPESERVE_X="" means unset (the default), as compose's ${TAPESERVE_X:-} passes it.
    model_config = SettingsConfigDict(
        env_prefix="TAPESERVE_", extra="forbid", frozen=True, validate_default=True, env_ignore_empty=True
    )

    # --- HTTP server
    # Loopback by default: exposing the service on a network is a deliberate choice.
    host: str = Field("127.0.0.1", min_length=1, description="Interface to listen on.")
    # The conventional development port.
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0: any free port).")
    # "info" shows start-up and access lines, which is what an operator looks at first.
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the server and its access log."
    )

    # --- worker pool
    # None: one worker per visible GPU, else one per 2 CPU cores (TF uses both threads of a core pair).
    workers: int | None = Field(None, ge=1, le=256, description="Worker processes (unset: automatic).")
    # None: derive from `workers` and the visible GPUs.
    devices: str | None = Field(
        None,
        description='Devices: "cpu", or GPU ids such as "0,1" or "0,0,1,1" (with workers: round robin).',
    )
    # Long enough for a cold trace plus a large Hessian; a request may ask for less with timeout_s.
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="Deadline of a request, seconds.")
    # A few seconds of backlog at typical request rates; beyond it clients are told to retry (503).
    queue_size: int = Field(64, ge=1, le=100_000, description="Requests waiting for a worker before 503.")
    # A safety net, not the leak bound (worker_memory_mb is): a successor's TF import and warm-up cost
    # ~3 s of CPU beside the serving processes. At 10,000 a sequential client (~900 requests/s) paid
    # that every ~11 s: p99 1.7 -> 5.8 ms on an idle 2-core machine (docs/performance.md).
    worker_max_jobs: int = Field(
        1_000_000, ge=1, description="Jobs after which a worker is replaced (its successor warms up first)."
    )
    # Unset: derived from the cgroup's memory limit (else the machine's memory) and the worker count,
    # so workers never push the host into its OOM killer; 0 switches the ceiling off.
    worker_memory_mb: int | None = Field(
        None,
        ge=0,
        description="Memory ceiling per worker, MiB, held during jobs (unset: derived from the memory "
        "limit and the worker count; 0: off).",
    )
    # None: memory growth on, so workers sharing a GPU take only what they use.
    gpu_memory_mb: int | None = Field(None, ge=64, description="GPU memory limit per worker, MiB.")
    # Small numeric kernels gain nothing from more threads; one keeps workers from fighting for cores.
    intra_op_threads: int = Field(1, ge=1, le=256, description="TensorFlow intra-op threads per worker.")
    inter_op_threads: int = Field(1, ge=1, le=256, description="TensorFlow inter-op threads per worker.")
    # A compiled program is ~100 KB-1 MB; 256 of them fit easily and cover a typical working set.
    cache_size: int = Field(256, ge=1, le=100_000, description="Compiled tape programs kept per worker.")
    numpy_plans: bool = Field(
        True,
        description="Run small programs seen before as numpy plans of their traced graphs, checked against "
        "TensorFlow (false: TensorFlow runs every call).",
    )
    # Unset: twice request_timeout_s. A client's timeout_s only bounds its own wait; the job keeps its
    # worker (so a cold compile that outlives its request is cached for the retry) until it ends or
    # runs this long.
    worker_kill_after_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="How long one job may run before its worker is killed, seconds (unset: twice "
        "request_timeout_s).",
    )
    # Long enough to stop a retry loop of a poison request, short enough to forgive a fluke.
    quarantine_s: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description="How long a program that crashed a worker, overran its run time or crossed the memory "
        "ceiling is refused, seconds (0: never).",
    )
    # 0: the scheduler's default. Under CPU contention a request waits for its API process and its
    # worker to be scheduled several times; a lower nice shortens those waits (docs/performance.md).
    # Below 0 needs CAP_SYS_NICE (compose: cap_add SYS_NICE); without it start-up logs why and goes on.
    nice: int = Field(
        0,
        ge=-20,
        le=19,
        description="Nice value of the API process and its workers (below 0 needs CAP_SYS_NICE).",
    )
    # 0: off. Nice orders threads only within one scheduling group (a session's autogroup, a
    # container's cgroup); SCHED_RR puts the event loop (at this priority) and each warm worker's
    # main thread (one below) ahead of every ordinary process, so a hop never waits behind another
    # tenant's time slice (docs/performance.md). Their later threads start ordinary. Needs CAP_SYS_NICE.
    realtime_priority: int = Field(
        0,
        ge=0,
        le=99,
        description="SCHED_RR priority of the API's event loop; workers take one less (0: off; 2-99; "
        "needs CAP_SYS_NICE).",
    )
    # Matches the default request deadline, so an in-flight request can always finish.
    shutdown_grace_s: float = Field(30.0, ge=0, le=3600, description="Time to finish in-flight work on stop.")

    # --- dynamic batching
    # 2 ms: long enough for concurrent clients' requests to meet, short next to a round trip; 0 turns
    # batching off. A request finding a worker idle is sent at once and never waits.
    batch_window_ms: float = Field(
        2.0, ge=0, le=100, description="Dynamic batching window, ms (0: off); idle workers never wait."
    )
    # 64 small problems stacked cost about as much as 3 single calls; more buys little.
    batch_max: int = Field(64, ge=2, le=1024, description="Most requests run as one vectorized call.")

    # --- UM-Bridge
    # None: /umbridge serves only the generic `expression` model, defined by each request's config.
    models: Path | None = Field(
        None, description="UM-Bridge models file (YAML, or JSON if it ends in .json) served under /umbridge."
    )

    # --- operations and security (service/api/security.py, metrics.py, logging.py)
    # None: no authentication, the loopback development default; any deployment sets keys.
    api_keys: SecretStr | None = Field(
        None, description="API keys, comma-separated; when set, /v1 and /umbridge need one (Bearer)."
    )
    # Hashed so the file can be shared with config management without leaking the keys themselves.
    api_keys_file: Path | None = Field(
        None, description="File of accepted keys as sha256 hex digests, one per line (# comments)."
    )
    # None: unlimited; a key's sustained rate, refilled continuously (token bucket).
    rate_limit: float | None = Field(
        None, gt=0, le=1_000_000, description="Requests per second per API key (unset: no limit)."
    )
    # 20: a client's short burst (a page of concurrent calls) passes; only sustained excess is refused.
    rate_limit_burst: int = Field(20, ge=1, le=1_000_000, description="Requests a key may send at once.")
    # 10 a second after a burst of 20: an ordinary client's mistakes never meet it; a loop of refused
    # requests (hundreds a second) is paced to ~10 a second and stops costing everyone the API's loop.
    refusal_rate: float = Field(
        10.0,
        ge=0.0,
        description="Refusals (4xx answers) per second a client gets at once, after its burst; beyond, "
        "they wait up to 1 s (0: off). Successful answers are never delayed.",
    )
    refusal_burst: int = Field(20, ge=1, le=1_000_000, description="Refusals a client may get at once.")
    # None: each process keeps its own buckets, so N replicas allow N times the rate; a Redis shared by
    # every replica makes the limit hold for the sum.
    rate_limit_store: str | None = Field(
        None,
        description='Where rate-limit buckets live: unset or "memory" (in each process, so per replica), '
        'or a Redis URL such as "redis://host:6379/0" shared by every replica.',
    )
    # None: X-Forwarded-For is ignored and a client is its peer address; behind a balancer, list the
    # balancer's addresses so the client it names counts (never "*" where clients reach replicas).
    forwarded_allow_ips: str | None = Field(
        None,
        description="Addresses (or networks) of balancers whose X-Forwarded-For and X-Forwarded-Proto are "
        'trusted, comma-separated, or "*" (unset: the headers are ignored).',
    )
    # None: no CORS headers, so browsers allow only same-origin pages (the built-in playground).
    cors_origins: str | None = Field(
        None, description='Origins allowed by CORS, comma-separated, or "*" (unset: CORS off).'
    )
    # False: metrics reveal traffic and load, so they need a key like the API when keys are set.
    metrics_public: bool = Field(False, description="Serve /metrics without a key even when keys are set.")
    # JSON lines are what log shippers parse; "text" is easier on a terminal.
    log_format: Literal["json", "text"] = Field("json", description="Log lines as JSON objects or as text.")

    # --- request limits (defaults and their reasons live in service/limits.py)
    max_body_bytes: int = Field(
        _DEFAULT_LIMITS.max_body_bytes,
        ge=1024,
        le=2**31,
        description="Largest request body, bytes (checked before parsing).",
    )
    max_expression_chars: int = Field(
        _DEFAULT_LIMITS.max_expression_chars,
        ge=1,
        le=1_000_000,
        description="Longest expression, function body or gradient, characters.",
    )
    # Capped at 150: the parser's recursion head-room is sized for that.
    max_nesting_depth: int = Field(
        _DEFAULT_LIMITS.max_nesting_depth,
        ge=1,
        le=150,
        description="Deepest nesting of brackets and operators (at most 150).",
    )
    max_syntax_nodes: int = Field(
        _DEFAULT_LIMITS.max_syntax_nodes,
        ge=1,
        le=1_000_000,
        description=(
            "Most syntax nodes in the expression or a function, user functions inlined; counted "
            "while parsing, which stops at the limit."
        ),
    )
    # None: follows the worker memory ceiling (service/limits.py input_elements_for).
    max_input_elements: int | None = Field(
        None,
        ge=1,
        description="Most elements in one input tensor (unset: the worker memory ceiling / 128 bytes, "
        "between 1,000,000 and max_tensor_elements; 2,000,000 when the ceiling is off).",
    )
    max_tensor_elements: int = Field(
        _DEFAULT_LIMITS.max_tensor_elements,
        ge=1,
        description="Most elements in any intermediate or output tensor (static shapes).",
    )
    max_literal_digits: int = Field(
        _DEFAULT_LIMITS.max_literal_digits, ge=1, le=10_000, description="Most digits in one numeric literal."
    )
    max_program_chars: int = Field(
        _DEFAULT_LIMITS.max_program_chars,
        ge=1,
        description="Most characters in all of a request's texts together (expression, function bodies, "
        "custom gradients).",
    )
    max_name_chars: int = Field(
        _DEFAULT_LIMITS.max_name_chars,
        ge=1,
        le=10_000,
        description="Most characters in a variable, constant, function or parameter name.",
    )
    max_functions: int = Field(
        _DEFAULT_LIMITS.max_functions, ge=0, le=10_000, description="Most user functions per request."
    )
    max_inputs: int = Field(
        _DEFAULT_LIMITS.max_inputs, ge=1, le=10_000, description="Most variables plus constants per request."
    )
    # Capped at 8: each order nests one more tape and multiplies the output size by the variable's size.
    max_order: int = Field(_DEFAULT_LIMITS.max_order, ge=1, le=8, description="Highest `order` (at most 8).")
    max_batch: int = Field(
        _DEFAULT_LIMITS.max_batch, ge=1, description="Most points along the batch axis when `batch` is true."
    )
    max_params: int = Field(
        _DEFAULT_LIMITS.max_params, ge=1, description="Most parameters (weights) in a model spec."
    )
    max_layers: int = Field(
        _DEFAULT_LIMITS.max_layers, ge=1, le=10_000, description="Most layers in a model spec."
    )
    max_steps: int = Field(
        _DEFAULT_LIMITS.max_steps, ge=1, description="Most optimizer steps in one train-step or step request."
    )

    @field_validator("worker_memory_mb")
    @classmethod
    def _ceiling_or_off(cls, value: int | None) -> int | None:
        if value is not None and 0 < value < 256:
            raise ValueError("worker_memory_mb must be 0 (off) or at least 256 (a warm worker takes ~500)")
        return value

    @field_validator("realtime_priority")
    @classmethod
    def _realtime_leaves_room_below(cls, value: int) -> int:
        if value == 1:
            raise ValueError(
                "realtime_priority must be 0 (off) or 2-99: workers take one less, and SCHED_RR starts at 1"
            )
        return value

    @field_validator("devices")
    @classmethod
    def _devices_listed(cls, value: str | None) -> str | None:
        # The full check (GPU ids must be visible) runs in pool_config(), which the CLI calls at start-up.
        if value is None or not value.strip():
            return None
        items = [item.strip() for item in value.split(",")]
        if not all(items):
            raise ValueError(f"empty entry in {value!r}; list devices as 'cpu' or e.g. '0,1'")
        return ",".join(items)

    @field_validator("models", mode="before")
    @classmethod
    def _models_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _models_file_valid(self) -> Self:
        # Loaded here so a broken models file stops start-up with its message; the app loads it again.
        if self.models is not None:
            from service.umbridge import load_models_file

            load_models_file(self.models, self.limits())  # ModelsFileError is a ValueError
        return self

    @field_validator("rate_limit_store")
    @classmethod
    def _store_known(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if value == "memory" or value.startswith(("redis://", "rediss://", "unix://")):
            return value
        raise ValueError('expected "memory" or a Redis URL (redis://, rediss:// or unix://)')

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _addresses(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        items = [item.strip() for item in value.split(",")]
        for item in items:
            if item == "*":
                continue
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network (or '*')") from None
        return ",".join(items)

    @field_validator("api_keys", "cors_origins", "api_keys_file", mode="before")
    @classmethod
    def _blank_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _api_keys_valid(self) -> Self:
        # Read here so a malformed keys file stops start-up with its message (never echoing a line).
        self.api_key_digests()
        return self

    def api_key_digests(self) -> frozenset[bytes]:
        """The sha256 digests of every accepted key (empty: authentication is off)."""
        from service.api.security import key_digests

        keys = self.api_keys.get_secret_value() if self.api_keys is not None else None
        return key_digests(keys, self.api_keys_file)

    def cors_origin_list(self) -> list[str]:
        """The configured CORS origins (empty: CORS off)."""
        return [item.strip() for item in (self.cors_origins or "").split(",") if item.strip()]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.max_input_elements is not None and self.max_input_elements > self.max_tensor_elements:
            raise ValueError("max_input_elements may not exceed max_tensor_elements (inputs are tensors too)")
        return self

    def limits(self) -> Limits:
        """The request limits as the plain dataclass every layer shares (built once: settings are frozen)."""
        return self.request_limits

    @functools.cached_property
    def request_limits(self) -> Limits:
        values = {name: getattr(self, name) for name in LIMIT_FIELDS}
        if self.max_input_elements is None:
            values["max_input_elements"] = input_elements_for(
                self.worker_memory_limit_mb(), self.max_tensor_elements, _DEFAULT_LIMITS.max_input_elements
            )
        return Limits(**values)

    def worker_memory_limit_mb(self) -> int | None:
        """Each worker's memory ceiling, MiB (None: off or unknown), as the pool will hold it."""
        from service.workers import resolve_devices, visible_gpus, worker_memory_ceiling

        try:
            workers = len(resolve_devices(self.workers, self.devices, visible_gpus(), os.cpu_count() or 1))
        except ValueError:  # devices that are not there: pool_config() refuses them at start-up
            workers = self.workers or 1
        return worker_memory_ceiling(self.worker_memory_mb, workers)

    def pool_config(self) -> PoolConfig:
        """The worker pool's configuration, with one device resolved per worker."""
        from service.workers import PoolConfig, resolve_devices, visible_gpus, worker_memory_ceiling

        devices = resolve_devices(self.workers, self.devices, visible_gpus(), os.cpu_count() or 1)
        return PoolConfig(
            devices=devices,
            queue_size=self.queue_size,
            default_timeout_s=self.request_timeout_s,
            max_jobs_per_worker=self.worker_max_jobs,
            memory_limit_mb=worker_memory_ceiling(self.worker_memory_mb, len(devices)),
            kill_after_s=self.worker_kill_after_s,
            quarantine_s=self.quarantine_s,
            gpu_memory_limit_mb=self.gpu_memory_mb,
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            cache_size=self.cache_size,
            numpy_plans=self.numpy_plans,
            shutdown_grace_s=self.shutdown_grace_s,
            nice=self.nice,
            realtime_priority=max(0, self.realtime_priority - 1),
            limits=self.limits(),
        )
