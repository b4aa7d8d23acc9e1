"""Reloading the rules from the config file, on SIGHUP or when the file, or a
labels file it names, changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from guard.control.config import Config, resolve, restart_only_changes
from guard.control.files import FileIdentity, FileWatcher
from guard.dataplane.errors import ConfigError

__all__ = ["Reloader"]

logger = logging.getLogger("guard")


class Reloader:
    """Loads the config file again and hands the new config to ``apply``; a bad
    file keeps the old rules. Flags, environment variables and dev mode keep
    overriding the file, as a restart with the same arguments would.

    The watcher follows the config file and the labels files of the rules in
    effect: the set changes with each reload that applies, and a failed one
    keeps the old set, whose files the old rules were read from.

    The file is read and checked on a worker thread: a large config takes
    seconds to load, and the event loop keeps serving meanwhile. Reloads run
    one at a time; only applying the new rules happens on the loop.
    """

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
        self.watcher = FileWatcher(self._files(current()), self._on_change)
        self._one_at_a_time = asyncio.Lock()
        self._waiting: asyncio.Task[bool] | None = None
        self._tasks: set[asyncio.Task[bool]] = set()

    def _files(self, config: Config) -> list[Path]:
        return [self._path, *config.labels_files] if self._path else []

    async def _on_change(self) -> bool:
        if self._current().labels_files:
            logger.info("config file %s or a labels file it names changed", self._path)
        else:
            logger.info("config file %s changed", self._path)
        await self.reload()
        return True

    def request(self) -> None:
        """Reload soon (SIGHUP's handler, which cannot wait). A request made
        while another waits to start joins it: a burst of signals is one reload
        after the one running, not one each."""
        if self._waiting is not None and not self._waiting.done():
            return
        self._waiting = task = asyncio.create_task(self.reload(), name="guard-config-reload")
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> bool:
        """Load the file again and apply it. Returns whether it worked."""
        if self._path is None:
            logger.warning("reload requested but the guard runs without a config file")
            return False
        async with self._one_at_a_time:
            if self._waiting is asyncio.current_task():
                self._waiting = None  # started: a new request is a new reload
            before = self.watcher.mark_seen()
            return await self._reload(self._path, before)

    async def _reload(self, path: Path, before: FileIdentity) -> bool:
        new: Config | None = None
        failure = ""
        named: tuple[Path, ...] = ()
        try:
            new = await asyncio.to_thread(resolve, path, self._overrides)
        except ConfigError as exc:
            failure, named = str(exc), exc.labels_files
        except Exception as exc:  # e.g. a file that is not UTF-8: never kill the watcher
            failure = f"{self._path}: cannot load: {type(exc).__name__}: {exc}"
        if self.watcher.identity() != before:
            # Rewritten in place while it was read: what was read may be half
            # of it. The watcher sees the change and reads it once it settles.
            logger.warning(
                "config file %s changed while it was being read; not applying what was read, "
                "it is read again once it stops changing (replace the file atomically: "
                "write a temporary file, then rename it)", path,
            )  # fmt: skip
            return False
        if new is None:
            self._count("failure")
            # One line, its problems joined: log collectors take each line for a record.
            problems = "; ".join(str(failure).splitlines())
            logger.error("config reload failed, keeping the previous rules: %s", problems)
            # The failed config's labels files too: fixing one is a change.
            self.watcher.watch(list(dict.fromkeys([*self._files(self._current()), *named])))
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
        self.watcher.watch(self._files(new))
        self._count("success")
        return True
