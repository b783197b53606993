"""``hutch serve``: the API under uvicorn, with the settings from the environment."""

from __future__ import annotations

import logging
import os

import uvicorn

from api.app import create_app
from service.settings import Settings
from service.store import JobStore


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the control plane until SIGINT/SIGTERM; then stop following jobs (and stop the local
    Ray head, if this service started one)."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per call to Ray: noise
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its steps: service.migrations logs the upgrade
    settings = Settings()
    settings.ray_token()  # a token file that cannot be read stops the start here, with its reason
    # So does a database whose schema this release cannot use (a SchemaError saying what to do);
    # the embedded default's is upgraded here.
    JobStore(settings.resolved_database_url, upgrade=settings.upgrades_database).close()
    app = create_app(settings)
    where = settings.ray_address or "a local Ray head (started now)"
    token_hint = "HUTCH_API_TOKENS" if settings.api_tokens else f"{settings.token_file}"
    logging.getLogger("hutch").info(
        "hutch on http://%s:%d — store %s, Ray %s, storage %s, API token in %s",
        host, port, _redacted(settings.resolved_database_url), where, settings.resolved_storage_path,
        token_hint,
    )  # fmt: skip
    # No access log: a line per request cost more than some routes, and /metrics counts and times
    # every request by route and status.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10, access_log=False)


def _redacted(url: str) -> str:
    """A database URL without its password, for the log."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
