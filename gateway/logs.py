"""The gateway's log format and level, applied through Litestar's logging
config so that its queue handler (log records are written off the event loop)
keeps our format and honours `server.log_level`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gateway.config import Config

if TYPE_CHECKING:
    from litestar.logging.config import LoggingConfig


# Libraries that log every request at INFO: noise, and latency on the hot path
# (the MCP SDK logs each stateless call's session twice).
_CHATTY = ("httpx", "httpx2", "httpcore", "mcp")


def quiet_http_loggers() -> None:
    level = max(logging.WARNING, logging.getLogger().level)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(level)


def setup_logging(config: Config) -> None:
    """Logging until the app starts (the supervisor's, the extraction process's,
    start-up errors); the app then configures the same format and level."""
    logging.basicConfig(level=config.server.python_log_level, format=config.log_format)
    quiet_http_loggers()


def logging_config(config: Config) -> LoggingConfig:
    # Imported here: the extraction process logs without loading Litestar.
    from litestar.logging.config import LoggingConfig

    return LoggingConfig(
        formatters={"standard": {"format": config.log_format}},
        root={"handlers": ["queue_listener"], "level": config.server.python_log_level},
        loggers={name: {"level": "WARNING"} for name in _CHATTY},
    )
