"""The error hierarchy. Every error dvla raises on purpose derives from :class:`DvlaError`, and
its message says what went wrong, where (file, field, endpoint, node) and, where it can, what to
do. The CLI prints such an error as one line and exits 2. This module imports nothing of ours."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeadlineExceeded",
    "DvlaError",
    "PoolError",
    "ProtocolError",
    "ResourceError",
    "TopologyError",
    "WireError",
]


class DvlaError(Exception):
    """Root of every error dvla raises on purpose."""


class ConfigError(DvlaError):
    """A configuration value (flag, environment variable, file) is wrong."""


class TopologyError(ConfigError):
    """A topology file is malformed: the message names the file and the key path."""

    def __init__(self, file: str, path: str, problem: str) -> None:
        self.file = file
        self.path = path
        self.problem = problem
        where = f"{file}: {path}" if path else file
        super().__init__(f"{where}: {problem}")


class WireError(DvlaError):
    """A message failed validation on receipt. ``reason`` is a short stable counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class ProtocolError(DvlaError):
    """A well-formed message arrived where the protocol does not allow it."""


class ResourceError(DvlaError):
    """A socket, shared-memory segment or process could not be created or used."""


class PoolError(ResourceError):
    """Misuse of a pool: double release, stale generation, foreign slot."""


class DeadlineExceeded(DvlaError, TimeoutError):
    """A blocking wait passed its deadline; the message says what was awaited and for how long."""
