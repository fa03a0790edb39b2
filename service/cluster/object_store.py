"""An S3-compatible bucket holding bundle bytes under content-addressed, immutable keys.

    <prefix>/<task>/<sha256>.safetensors

The same bytes for the same task always get the same key, so a retried or repeated upload writes the
object again instead of adding one, and a key, once written, never names other bytes. Nothing here knows
about versions or the registry: `service.cluster.s3_store` decides which keys are live, and
`service.cluster.gc` which ones may go.

Why checks on every write: an upload is acknowledged only when its bytes are durable in the bucket, so
`put_verified` sends the SHA-256 for the server to check (`ChecksumSHA256`), stores it as object metadata
too, then reads the object's head back and compares size and checksum before it returns.

Every failure to reach the bucket (refused, timed out, access denied, no such bucket) is `StoreUnavailable`
with a message naming the endpoint and bucket, never the credentials, which live only inside the boto3
session (from `SecretStr` settings, or boto3's own chain: environment, instance profile, IRSA) and the signer
of object reads (`service.cluster.signed_get`), never in a repr.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions
from botocore.config import Config

from service.cluster.signed_get import ClientRead, ObjectNotFound, SignedGet
from service.errors import StoreUnavailable
from service.settings import check_s3_access

if TYPE_CHECKING:
    from service.settings import ServiceSettings

log = logging.getLogger(__name__)

_SUFFIX = ".safetensors"
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}


@dataclass(frozen=True)
class StoredObject:
    """One object as a bucket listing shows it."""

    key: str
    size: int
    last_modified: datetime


ATTEMPTS = 2
"""Tries of each S3 call (botocore's `max_attempts`: the first and one retry)."""
RETRY_WAIT_S = 20.0
"""The longest botocore's standard retry mode waits before a retry (its backoff cap)."""


class S3Bucket:
    """A bucket (and key prefix) on an S3-compatible endpoint. Thread-safe: boto3 clients are."""

    def __init__(
        self, *, endpoint: str | None, bucket: str, prefix: str = "bundles", region: str = "us-east-1",
        access_key_id: str | None = None, secret_access_key: str | None = None, timeout_s: float = 5.0,
        max_connections: int = 32,
    ):
        self.endpoint = endpoint
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.timeout_s = timeout_s
        config = Config(
            region_name=region, connect_timeout=timeout_s, read_timeout=timeout_s, max_pool_connections=max_connections,
            retries={"max_attempts": ATTEMPTS, "mode": "standard"},  # one quick retry; more would only delay the 503
            s3={"addressing_style": "path"},  # MinIO, SeaweedFS and plain hostnames need path-style
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        check_s3_access(access_key_id, secret_access_key, prefix)
        session = boto3.session.Session(aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key)
        self.client: Any = session.client("s3", endpoint_url=endpoint, config=config)
        # Object reads (every cold load of a task not cached on disk) skip the client's per-call machinery
        # where they can (`service.cluster.signed_get`): with credentials to sign with and no proxy.
        credentials = session.get_credentials()
        self._read = SignedGet(
            self.client, credentials, bucket, ca_bundle=session._session.get_config_variable("ca_bundle"),
            timeout_s=timeout_s, max_connections=max_connections,
        ) if SignedGet.usable(self.client, credentials) else None

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> S3Bucket:
        key, secret = settings.s3_access_key_id, settings.s3_secret_access_key
        return cls(
            endpoint=settings.s3_endpoint, bucket=settings.s3_bucket, prefix=settings.s3_prefix,
            region=settings.s3_region, timeout_s=settings.s3_timeout_s,
            access_key_id=key.get_secret_value() if key else None,
            secret_access_key=secret.get_secret_value() if secret else None,
        )

    @property
    def longest_call_s(self) -> float:
        """An upper bound of one call's duration: every attempt's connect and read timeouts and the waits between
        them (what a garbage collector's claim must outlast, `service.cluster.gc`)."""
        return ATTEMPTS * 2 * self.timeout_s + (ATTEMPTS - 1) * RETRY_WAIT_S

    def __repr__(self) -> str:  # never the credentials
        return f"S3Bucket(endpoint={self.endpoint!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    @property
    def where(self) -> str:
        return f"bucket '{self.bucket}' at {self.endpoint or 'AWS S3'}"

    def key_for(self, task: str, sha256: str) -> str:
        """The content-addressed key of `task`'s bundle with this SHA-256."""
        return f"{self.prefix}/{task}/{sha256}{_SUFFIX}"

    # --- calls ------------------------------------------------------------------------------------

    def put_verified(self, key: str, data: bytes, sha256: str) -> None:
        """Write `data` under `key`, then confirm the bucket holds exactly these bytes (size and SHA-256)."""
        digest = base64.b64encode(bytes.fromhex(sha256)).decode()
        with self.errors(f"writing {key}"):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ChecksumSHA256=digest,
                                   Metadata={"sha256": sha256}, ContentType="application/octet-stream")
            head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        stored_sha = head.get("Metadata", {}).get("sha256")
        stored_digest = head.get("ChecksumSHA256")
        if (head["ContentLength"] != len(data) or stored_sha != sha256
                or (stored_digest is not None and stored_digest.split("-")[0] != digest)):
            raise StoreUnavailable(f"object store ({self.where}) did not keep {key} intact: stored "
                                   f"{head['ContentLength']} bytes, sha256 {stored_sha}; sent {len(data)}, {sha256}")

    def get(self, key: str, sha256: str) -> bytes:
        """The object's bytes, checked against `sha256` (a mismatch is StoreUnavailable, never served)."""
        data = None
        if self._read is not None:
            with contextlib.suppress(ClientRead):  # an answer the client handles (redirect, throttling, refusal)
                data = self._read(key, self.where)
        if data is None:
            with self.errors(f"reading {key}"):
                data = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StoreUnavailable(f"object store ({self.where}) returned {key} with the wrong checksum")
        return data

    def exists(self, key: str) -> bool:
        try:
            with self.errors(f"reading the head of {key}"):
                self.client.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        with self.errors(f"deleting {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def list(self) -> Iterator[StoredObject]:
        """Every object under the prefix (bundle keys only), page by page."""
        with self.errors("listing objects"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + "/")
            for page in pages:
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith(_SUFFIX):
                        yield StoredObject(obj["Key"], int(obj["Size"]), obj["LastModified"])

    def ping(self) -> None:
        with self.errors("checking the bucket"):
            self.client.head_bucket(Bucket=self.bucket)

    def ensure_bucket(self) -> bool:
        """Create the bucket when it does not exist; True if it was created."""
        try:
            self.ping()
            return False
        except ObjectNotFound:
            pass
        with self.errors("creating the bucket"):
            self.client.create_bucket(Bucket=self.bucket)
        log.info("created %s", self.where)
        return True

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Turn boto3/botocore failures into StoreUnavailable (ObjectNotFound for a missing key or bucket)."""
        try:
            yield
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_CODES:
                raise ObjectNotFound(f"object store ({self.where}): {doing}: not found ({code})") from exc
            raise StoreUnavailable(f"object store ({self.where}) refused {doing}: {code or exc}") from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise StoreUnavailable(f"object store ({self.where}) unreachable while {doing}: {exc}") from exc
