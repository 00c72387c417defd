"""The HTTP floor: the smallest FastAPI JSON endpoint, same server stack as tapeserve."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

app = FastAPI()


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/echo")
def echo(body: dict[str, Any]) -> dict[str, Any]:
    return body
