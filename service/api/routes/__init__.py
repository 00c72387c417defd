"""One router per resource: gradient computation, the language reference, and health checks."""

from service.api.routes import functions, gradient, health

__all__ = ["functions", "gradient", "health"]
