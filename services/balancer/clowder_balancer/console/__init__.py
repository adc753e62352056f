"""The web console at /console: static pages that use only the public APIs: the OpenAI API and the REST gateway
(clowder_balancer.gateway, whose GET /api/v1/runtime-stats was added for the console's load cards)."""

from clowder_balancer.console.routes import install_console

__all__ = ["install_console"]
