"""The gateway's log format and level, applied through Litestar's logging
config so that its queue handler (log records are written off the event loop)
keeps our format and honours `server.log_level`."""

from __future__ import annotations

import logging

from litestar.logging.config import LoggingConfig

from gateway.config import Config


def quiet_http_loggers() -> None:
    """httpx logs every request at INFO: noise, and latency on the hot path."""
    level = max(logging.WARNING, logging.getLogger().level)
    for name in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(name).setLevel(level)


def logging_config(config: Config) -> LoggingConfig:
    return LoggingConfig(
        formatters={"standard": {"format": config.server.log_format}},
        root={"handlers": ["queue_listener"], "level": config.server.python_log_level},
    )
