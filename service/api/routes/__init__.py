"""Routes that are not in the endpoint table (service/api/endpoints.py): the language reference,
health checks, the playground and the UM-Bridge protocol."""

from service.api.routes import functions, health

__all__ = ["functions", "health"]
