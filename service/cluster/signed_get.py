"""Object reads as one SigV4-signed HTTP GET: a cold load's fetch without the boto3 client's per-call machinery.

A replica fetches a bundle from the bucket on every cold load of a task it has not cached (under Zipf
traffic over thousands of tasks, most misses), on the forward worker, sharing the CPU and the GIL with the
event loop. boto3's `get_object` spends about twice the client CPU of the request itself on its per-call
machinery (event hooks, request and response models); measured per 160 KB object in docs/benchmarks.md
(session 11). Nothing of the protocol is written here: the signature is botocore's own (`S3SigV4Auth`, with
the session's credentials, refreshed as boto3 refreshes them) and the connection pool urllib3's (what
botocore sends through); this module only builds the URL and maps the answer to the store's errors. Every
other call (writes, heads, listings, deletes) stays on the boto3 client.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import quote

import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.httpsession import get_cert_path

from service.errors import StoreUnavailable

MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})


class ObjectNotFound(StoreUnavailable):
    """A key the registry names is not in the bucket (deleted behind the service's back, or a wrong bucket)."""


class SignedGet:
    """GET `bucket/key` on the client's endpoint, path-style (as the boto3 client is configured), signed with
    `credentials`. Thread-safe (urllib3's pool is). One retry on a connection or read error, as the client."""

    def __init__(self, client: Any, credentials: Credentials, bucket: str, *, timeout_s: float,
                 max_connections: int):
        self.endpoint = str(client.meta.endpoint_url).rstrip("/")
        self.region = str(client.meta.region_name)
        self.bucket, self._credentials = bucket, credentials
        self._http = urllib3.PoolManager(
            maxsize=max_connections, ca_certs=get_cert_path(True), cert_reqs="CERT_REQUIRED",
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
            retries=urllib3.Retry(total=1, connect=1, read=1, status=0, redirect=0, raise_on_status=False),
        )

    def url(self, key: str) -> str:
        return f"{self.endpoint}/{quote(self.bucket)}/{quote(key, safe='/-_.~')}"

    def __call__(self, key: str, where: str) -> bytes:
        """The object's bytes; ObjectNotFound when the key or bucket is missing, StoreUnavailable on any other
        answer or failure (its message names `where` and the key, never the credentials)."""
        url = self.url(key)
        request = AWSRequest(method="GET", url=url)
        S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self.region).add_auth(request)
        try:
            response = self._http.request("GET", url, headers=dict(request.headers.items()), redirect=False)
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnavailable(f"object store ({where}) unreachable while reading {key}: {exc}") from exc
        if response.status == 200:
            data: bytes = response.data
            return data
        code = error_code(response.data) or str(response.status)
        if response.status == 404 or code in MISSING_CODES:
            raise ObjectNotFound(f"object store ({where}): reading {key}: not found ({code})")
        raise StoreUnavailable(f"object store ({where}) refused reading {key}: {code} (HTTP {response.status})")


def error_code(body: bytes) -> str | None:
    """The `<Code>` of an S3 error document, if the body is one."""
    try:
        return ET.fromstring(body).findtext("Code")
    except ET.ParseError:
        return None
