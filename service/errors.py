"""Domain errors. Only `service.api` maps them to HTTP status codes; everything below raises these."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `message` is safe to show to a client as-is."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class TaskNotFound(ServiceError):
    def __init__(self, task: str):
        super().__init__(f"unknown task '{task}'")
        self.task = task


class VersionNotFound(ServiceError):
    def __init__(self, task: str, version: int):
        super().__init__(f"task '{task}' has no version {version}")
        self.task = task
        self.version = version


class InvalidTaskName(ServiceError):
    """A task name that does not match `^[a-z0-9][a-z0-9_-]{0,63}$` (also guards store paths)."""


class BundleInvalid(ServiceError):
    """A bundle refused on validation. `code` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class BundleTooLarge(BundleInvalid):
    def __init__(self, size: int, limit: int):
        super().__init__("too_large", f"bundle is {size} bytes, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class BackboneMismatch(BundleInvalid):
    """The bundle was trained for another backbone (fingerprint, hidden size or layer count)."""


class InvalidInput(ServiceError):
    """A request body that does not fit the task (wrong shape for the head, empty text, ...)."""


class UnsupportedMediaType(ServiceError):
    """A request body in a media type the operation does not take (e.g. text/plain where JSON is expected)."""


class InputTooLarge(ServiceError):
    """A text over the configured character limit."""


class Overloaded(ServiceError):
    """Temporarily unable to take more work; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class CacheFull(Overloaded):
    """Every resident adapter is pinned by in-flight work, so nothing can be evicted for a new one."""


class StoreUnavailable(ServiceError):
    """The adapter store (e.g. Redis) cannot be reached."""


class NotReady(ServiceError):
    """The service is starting or shutting down."""


class ConfigurationError(ServiceError):
    """Settings that cannot work (e.g. a cache budget that holds no adapter): refused at start-up."""


class BackboneLoadError(ServiceError):
    """The backbone could not be loaded (unknown id, not available offline, unsupported architecture)."""
