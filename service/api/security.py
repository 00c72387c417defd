"""API keys and per-key rate limits: one pure ASGI middleware in front of /v1, /umbridge and /metrics.

Keys are compared as sha256 digests with ``hmac.compare_digest`` against every accepted digest, so
neither the time taken nor an early exit says how much of a key was right, and the server holds
only digests (``TAPESERVE_API_KEYS`` is hashed at start-up; ``TAPESERVE_API_KEYS_FILE`` holds digests).
A key is never logged: the request log names a key by the first 8 hex digits of its digest.

What stays open without a key: the probes (/healthz, /readyz), the documentation (/, /docs,
/openapi.json, /static: the playground page and the schema describe the API, they compute nothing;
the playground's own calls carry the key) and CORS preflights. /metrics is protected unless
``metrics_public``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.problems import PROBLEM_MEDIA_TYPE, problem_response
from service.api.ratelimit import RateLimiter, TokenBuckets
from service.errors import TapeserveError

__all__ = [
    "AuthMiddleware",
    "RateLimited",
    "TokenBuckets",
    "Unauthorized",
    "document_api_keys",
    "is_protected",
    "key_digests",
]

# Paths that need a key when keys are set. Everything that computes lives under these.
_PROTECTED_PREFIXES = ("/v1/", "/umbridge/")
_PROTECTED_EXACT = frozenset({"/v1", "/umbridge", "/gradient"})
_METRICS_PATH = "/metrics"
# A sha256 digest in hex.
_DIGEST_HEX_CHARS = 64


class Unauthorized(TapeserveError):
    code = "unauthorized"
    status = 401
    title = "Unauthorized"


class RateLimited(TapeserveError):
    code = "rate_limited"
    status = 429
    title = "Too many requests"


def key_digests(keys: str | None, keys_file: Path | None) -> frozenset[bytes]:
    """Digests of the comma-separated ``keys`` and of the hex digests listed in ``keys_file``.

    Raises ValueError (naming the line, never its content) for a line that is not a sha256 hex digest.
    """
    listed = [key.strip() for key in (keys or "").split(",") if key.strip()]
    digests = {hashlib.sha256(key.encode()).digest() for key in listed}
    if keys_file is not None:
        try:
            text = keys_file.read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"cannot read the API keys file {str(keys_file)!r}: {error.strerror}") from None
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip().lower()
            if not line:
                continue
            if len(line) != _DIGEST_HEX_CHARS or any(c not in "0123456789abcdef" for c in line):
                raise ValueError(
                    f"{keys_file}, line {number}: expected a sha256 hex digest (64 hex digits, e.g. "
                    "the output of `printf %s KEY | sha256sum`)"
                )
            digests.add(bytes.fromhex(line))
    return frozenset(digests)


def is_protected(path: str, *, metrics_public: bool) -> bool:
    """Whether ``path`` needs a key when keys are configured."""
    if path.startswith(_PROTECTED_PREFIXES) or path in _PROTECTED_EXACT:
        return True
    return path == _METRICS_PATH and not metrics_public


class AuthMiddleware:
    """Refuses protected requests without a valid key (401) or over their key's rate (429).

    Sits outside the body limit, so a refused client never makes the server read its body, and
    inside the UM-Bridge error middleware, so /umbridge answers in its protocol's envelope.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        digests: frozenset[bytes],
        metrics_public: bool,
        limiter: RateLimiter | None,
    ) -> None:
        self.app = app
        self.digests = tuple(digests)
        self.metrics_public = metrics_public
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)  # CORS preflights carry no credentials by design
            return
        path: str = scope["path"]
        if not is_protected(path, metrics_public=self.metrics_public):
            await self.app(scope, receive, send)
            return
        digest = self._authenticate(scope)
        if digest is None:
            if self.digests:
                refusal = Unauthorized(
                    "this endpoint needs an API key: send the header 'Authorization: Bearer <key>'"
                    if not _has_authorization(scope)
                    else "the API key is not valid (expected 'Authorization: Bearer <key>')"
                )
                headers = {"WWW-Authenticate": 'Bearer realm="tapeserve"'}
                await problem_response(refusal, path, headers)(scope, receive, send)
                return
            # Keys off: the client's address stands in for the key (the bucket's name only). It is the
            # peer's address, or X-Forwarded-For's when the peer is a trusted balancer (uvicorn's
            # proxy headers, TAPESERVE_FORWARDED_ALLOW_IPS).
            client = scope.get("client")
            digest = b"addr:" + (client[0] if client else "").encode()
        if self.limiter is not None:
            wait = await self.limiter.take(digest)
            if wait > 0.0:
                retry_after = max(1, math.ceil(wait))
                error = RateLimited(
                    f"more than {self.limiter.rate:g} requests per second (burst {self.limiter.burst:g}) "
                    f"for this API key; retry after {retry_after} s",
                    retry_after=retry_after,
                )
                await problem_response(error, path, {"Retry-After": str(retry_after)})(scope, receive, send)
                return
        if self.digests:
            scope["tapeserve.key_id"] = digest[:4].hex()
        await self.app(scope, receive, send)

    def _authenticate(self, scope: Scope) -> bytes | None:
        """The digest of the request's key if it is one of ours; None otherwise (or when keys are off)."""
        if not self.digests:
            return None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer" or not token.strip():
                    return None
                candidate = hashlib.sha256(token.strip()).digest()
                # Compare with every digest, without stopping at a match: the time does not depend on
                # which key matched or on how many bytes of a wrong key were right.
                found = False
                for digest in self.digests:
                    found |= hmac.compare_digest(candidate, digest)
                return candidate if found else None
        return None


def document_api_keys(openapi: dict[str, Any], *, metrics_public: bool) -> None:
    """Add the bearer scheme (optional: keys may be off) and the 401/429 answers to protected operations."""
    schemes = openapi.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["apiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key; required when the server has keys configured (TAPESERVE_API_KEYS).",
    }
    for path, operations in openapi.get("paths", {}).items():
        if not is_protected(path, metrics_public=metrics_public):
            continue
        umbridge = path.startswith("/umbridge")
        media = "application/json" if umbridge else PROBLEM_MEDIA_TYPE
        ref = "#/components/schemas/UMErrorResponse" if umbridge else "#/components/schemas/Problem"
        for operation in operations.values():
            operation["security"] = [{}, {"apiKey": []}]
            responses = operation.setdefault("responses", {})
            for status, description in _AUTH_RESPONSES.items():
                responses.setdefault(
                    status, {"description": description, "content": {media: {"schema": {"$ref": ref}}}}
                )


_AUTH_RESPONSES = {
    "401": "No API key, or not a valid one (keys configured); with WWW-Authenticate: Bearer.",
    "429": "Over this key's rate limit (with Retry-After).",
}


def _has_authorization(scope: Scope) -> bool:
    return any(name == b"authorization" for name, _ in scope["headers"])
