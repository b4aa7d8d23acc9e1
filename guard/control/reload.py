"""Reloading the rules from the config file, on SIGHUP or when the file changes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from guard.control.config import Config, resolve, restart_only_changes
from guard.control.files import FileWatcher
from guard.dataplane.errors import ConfigError

__all__ = ["Reloader"]

logger = logging.getLogger("guard")


class Reloader:
    """Loads the config file again and hands the new config to ``apply``; a bad
    file keeps the old rules. Flags, environment variables and dev mode keep
    overriding the file, as a restart with the same arguments would."""

    def __init__(
        self,
        path: Path | None,
        overrides: Mapping[str, Any],
        current: Callable[[], Config],
        apply: Callable[[Config], None],
        count: Callable[[str], None],
    ) -> None:
        self._path = path
        self._overrides = dict(overrides)
        self._current = current
        self._apply = apply
        self._count = count
        self.watcher = FileWatcher([path] if path else [], self._on_change)

    def _on_change(self) -> bool:
        logger.info("config file %s changed", self._path)
        self.reload()
        return True

    def reload(self) -> bool:
        """Load the file again and apply it. Returns whether it worked."""
        if self._path is None:
            logger.warning("reload requested but the guard runs without a config file")
            return False
        self.watcher.mark_seen()
        try:
            new = resolve(self._path, self._overrides)
        except ConfigError as exc:
            self._count("failure")
            logger.error("config reload failed, keeping the previous rules: %s", exc)
            return False
        except Exception as exc:  # e.g. a file that is not UTF-8: never kill the watcher
            self._count("failure")
            logger.error(
                "config reload failed, keeping the previous rules: %s: cannot load: %s: %s",
                self._path, type(exc).__name__, exc,
            )  # fmt: skip
            return False
        if self._current().models and not new.models:
            logger.warning(
                "config reload: the new config has no model rules; from now on the guard "
                "only proxies, and guards nothing"
            )
        restart_only = restart_only_changes(self._current(), new)
        if restart_only:
            logger.warning(
                "config reload: %s changed; these take effect only after a restart, "
                "the rules take effect now", ", ".join(restart_only),
            )  # fmt: skip
        self._apply(new)
        self._count("success")
        return True
