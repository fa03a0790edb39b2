"""Object reads as one SigV4-signed HTTP GET: a cold load's fetch without the boto3 client's per-call machinery.

A replica fetches a bundle from the bucket on every cold load of a task it has not cached (under Zipf
traffic over thousands of tasks, most misses), on the forward worker, sharing the CPU and the GIL with the
event loop. boto3's `get_object` spends about as much client CPU on its per-call machinery (event hooks,
request and response models) as on the request itself; measured per 160 KB object in docs/benchmarks.md
(session 11). Nothing of the protocol is written here: the signature is botocore's own (`S3SigV4Auth`, with
the session's credentials, refreshed as boto3 refreshes them) and the connection pool urllib3's (what
botocore sends through), with the client's CA bundle. This path only serves the common answer: 200 is the
object, 404 is not found; any other answer (a redirect to the bucket's region, throttling, a server error,
a refusal) is read again through the boto3 client, with its retries, redirects and error mapping. Every
other call (writes, heads, listings, deletes) stays on the client.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import quote

import botocore.exceptions
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.httpsession import get_cert_path
from botocore.utils import get_environ_proxies

from service.errors import StoreUnavailable


class ObjectNotFound(StoreUnavailable):
    """A key the registry names is not in the bucket (deleted behind the service's back, or a wrong bucket)."""


class ClientRead(Exception):
    """The signed GET got an answer it leaves to the boto3 client (see the module docstring)."""


class SignedGet:
    """GET `bucket/key` on the client's endpoint, path-style (as the boto3 client is configured), signed with
    `credentials`. Thread-safe (urllib3's pool is). One retry on a connection or read error, as the client."""

    def __init__(self, client: Any, credentials: Credentials, bucket: str, *, ca_bundle: str | None,
                 timeout_s: float, max_connections: int):
        self.endpoint = str(client.meta.endpoint_url).rstrip("/")
        self.region = str(client.meta.region_name)
        self.bucket, self._credentials = bucket, credentials
        self._http = urllib3.PoolManager(
            maxsize=max_connections, ca_certs=ca_bundle or get_cert_path(True), cert_reqs="CERT_REQUIRED",
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
            retries=urllib3.Retry(total=1, connect=1, read=1, status=0, redirect=0, raise_on_status=False),
        )

    @classmethod
    def usable(cls, client: Any, credentials: Credentials | None) -> bool:
        """Whether this path can stand in for the client's reads: credentials to sign with, and no proxy
        between the service and the endpoint (the client's proxy handling is not reproduced here)."""
        return credentials is not None and not get_environ_proxies(str(client.meta.endpoint_url))

    def url(self, key: str) -> str:
        return f"{self.endpoint}/{quote(self.bucket)}/{quote(key, safe='/-_.~')}"

    def __call__(self, key: str, where: str) -> bytes:
        """The object's bytes. ObjectNotFound on 404, StoreUnavailable when the endpoint cannot be reached or
        no credentials can be had (messages name `where` and the key, never the credentials), ClientRead
        for any other answer."""
        url = self.url(key)
        try:
            request = AWSRequest(method="GET", url=url)
            S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self.region).add_auth(request)
            response = self._http.request("GET", url, headers=dict(request.headers.items()), redirect=False)
        except (urllib3.exceptions.HTTPError, botocore.exceptions.BotoCoreError, OSError) as exc:
            raise StoreUnavailable(f"object store ({where}) unreachable while reading {key}: {exc}") from exc
        if response.status == 200:
            data: bytes = response.data
            return data
        code = error_code(response.data) or str(response.status)
        if response.status == 404:
            raise ObjectNotFound(f"object store ({where}): reading {key}: not found ({code})")
        raise ClientRead(f"{response.status} {code}")


def error_code(body: bytes) -> str | None:
    """The `<Code>` of an S3 error document, if the body is one."""
    try:
        return ET.fromstring(body).findtext("Code")
    except ET.ParseError:
        return None
