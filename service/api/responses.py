"""JSON responses rendered with orjson (the hot path returns plain dicts; no model re-validation).

A `JSONResponse` subclass, so that FastAPI publishes each route's `response_model` as the body schema (for
any other response class it would publish a bare string)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class JSON(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
