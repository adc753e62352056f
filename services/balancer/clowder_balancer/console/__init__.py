"""The web console at /console: static pages that use only the public APIs (REST bridge, OpenAI API), plus the
one public route they needed that no API had: GET /api/v1/runtime-stats (see stats_api)."""

from clowder_balancer.console.routes import install_console

__all__ = ["install_console"]
