"""The HTTP API: app factory, routes, wire schemas, error handling and settings (no TensorFlow here)."""

from service.api.app import create_app
from service.api.settings import Settings

__all__ = ["Settings", "create_app"]
