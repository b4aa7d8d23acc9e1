"""Running the guard: metrics endpoint, gRPC server, signals, reload, dev mode."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from guard._version import __version__
from guard.control.config import Config
from guard.control.descriptors import raise_descriptor_limit
from guard.control.memory import Trimmer, tune_malloc
from guard.control.net import split_address
from guard.control.preflight import CannotStart
from guard.control.process import ChildStartError, keep_fresh, write_port_file
from guard.control.reload import Reloader
from guard.dataplane import kernels
from guard.dataplane.errors import ConfigError
from guard.metrics.endpoint import start_metrics_server
from guard.metrics.guard_metrics import GuardMetrics
from guard.server.proxy import GuardServer

if TYPE_CHECKING:
    from guard.server.rest import RestFrontEnd

__all__ = ["configure_logging", "run_serve"]

logger = logging.getLogger("guard")


_SUMMARY_MODELS = 20  # a log line per reload, not a copy of the config


def _summary(config: Config) -> str:
    rules = sum(len(m.outputs) for m in config.models)
    shown = [f"{m.name}/{m.signature}" for m in config.models[:_SUMMARY_MODELS]]
    if len(config.models) > _SUMMARY_MODELS:
        shown.append(f"and {len(config.models) - _SUMMARY_MODELS} more")
    models = ", ".join(shown) or "none"
    return (
        f"guard {__version__}: listen={config.listen} upstream={config.upstream} "
        f"rest_listen={config.rest_listen if config.rest_upstream else 'off'} "
        f"rest_upstream={config.rest_upstream} "
        f"metrics={config.metrics_listen} timeout={config.default_timeout_s}s "
        f"max_message_mb={config.max_message_mb} "
        f"max_concurrent_rpcs={config.max_concurrent_rpcs} "
        f"tls={'on' if config.tls else 'off'} models=[{models}] output_rules={rules}"
    )


def _why(exc: ChildStartError) -> str:
    """The backend's own error line from the log tail ``exc`` carries
    (TensorFlow's start-up lines come before it), else its last line."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    errors = [line.split(": ", 1)[-1] for line in lines if " ERROR " in line]
    return (errors or lines or ["no output"])[-1]


@contextlib.contextmanager
def _dev_backend(models: Sequence[str], max_message_mb: int) -> Iterator[tuple[str, str]]:
    """Start ``guard backend`` as a child process and yield its gRPC and REST addresses."""
    from guard.dev.backend import start_backend
    from guard.dev.backend.cli import parse_model_args

    logger.info("dev mode: starting the local backend for %s", ", ".join(models))
    with contextlib.ExitStack() as stack:
        try:
            backend = stack.enter_context(
                start_backend(
                    parse_model_args(list(models)),
                    max_message_mb=max_message_mb,
                    rest_listen="127.0.0.1:0",
                )
            )
        except ChildStartError as exc:
            raise CannotStart(f"--model: the local backend did not start: {_why(exc)}") from None
        assert backend.rest_address is not None
        logger.info(
            "dev mode: local backend serving gRPC on %s, REST on %s",
            backend.address, backend.rest_address,
        )  # fmt: skip
        yield backend.address, backend.rest_address


@dataclass
class _Running:
    """What one serving process started, to stop in reverse."""

    server: GuardServer
    rest: RestFrontEnd | None
    metrics_port: int
    httpd: Any
    reloader: Reloader

    def ports(self) -> dict[str, int]:
        """The port file's content: every port this process serves on."""
        ports = {"grpc": self.server.port, "metrics": self.metrics_port}
        if self.rest is not None:
            ports["rest"] = self.rest.port
        return ports

    async def stop(self) -> None:
        """Both front-ends drain at once, within shutdown_grace_s."""
        stopping = [self.server.stop()]
        if self.rest is not None:
            stopping.append(self.rest.stop())
        await asyncio.gather(*stopping)


async def _start(
    config: Config, config_path: Path | None, overrides: Mapping[str, Any]
) -> _Running:
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, config.model_names(), config.max_class_label_values)
    for result in ("success", "failure"):
        metrics.config_reloads.labels(result)
    host, port = split_address(config.metrics_listen)
    httpd, _thread = start_metrics_server(host, port, registry)
    server = GuardServer(config, metrics)
    await server.start()
    try:
        rest = await _start_rest(server) if config.rest_upstream is not None else None
    except BaseException:
        # REST could not bind (its port taken since the check): stop what
        # started, or gRPC's servers outlive the loop and print tracebacks.
        await server.stop(0)
        httpd.shutdown()
        httpd.server_close()
        raise

    def apply(new: Config) -> None:
        # Only the rules reload: the running settings stay, and the summary
        # says so (the book was built with the new file's max_message_mb,
        # while the servers kept theirs).
        effective = replace(server.config, models=new.models, labels_files=new.labels_files)
        server.swap_rules(effective)
        logger.info("config reloaded: %s", _summary(effective))

    reloader = Reloader(
        config_path,
        overrides,
        current=lambda: server.config,
        apply=apply,
        count=lambda result: metrics.config_reloads.labels(result).inc(),
    )
    return _Running(server, rest, httpd.server_port, httpd, reloader)


async def _start_rest(server: GuardServer) -> RestFrontEnd:
    """The REST front-end, imported only when served: aiohttp and its parsers
    cost about 9 MB of memory that a gRPC-only guard does not pay."""
    from guard.server.rest import RestFrontEnd

    rest = RestFrontEnd(server)
    await rest.start()
    return rest


class _Stop:
    """Why the process stops: a signal (exit 0), or a fatal failure (exit 1)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.fatal: str | None = None

    def die(self, reason: str) -> None:
        self.fatal = self.fatal or reason
        self.event.set()


def _quiet_grpc_crash(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """grpc.aio's own shutdown task after its accept loop raised (the guard
    restarts the server and logs it): one debug line, not a traceback."""
    if isinstance(context.get("exception"), UnicodeDecodeError):
        logger.debug("grpc.aio's shutdown of a crashed server failed: %s", context["exception"])
        return
    loop.default_exception_handler(context)


def _on_signals(running: _Running, stop: _Stop, trimmer: Trimmer) -> list[asyncio.Task[None]]:
    """Signals and background tasks; before the port file, since whoever waits
    for that file may send SIGTERM at once, and it must drain, not kill."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_grpc_crash)
    running.server.on_fatal = stop.die
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.event.set)
    loop.add_signal_handler(signal.SIGHUP, running.reloader.request)
    return [
        asyncio.create_task(running.reloader.watcher.run(), name="guard-config-watch"),
        asyncio.create_task(trimmer.run(), name="guard-malloc-trim"),
    ]


def _announce(port_file: Path | None, running: _Running) -> asyncio.Task[None] | None:
    """Write the port file, and keep it fresh until the drain has ended: a
    supervisor takes a worker whose file goes stale for stalled, and a
    draining worker is not (it was killed 10 s into a 30 s drain)."""
    if port_file is None:
        return None
    ports = running.ports()
    write_port_file(port_file, ports)
    return asyncio.create_task(keep_fresh(port_file, ports), name="guard-heartbeat")


def _ignore_reloads() -> None:
    """SIGHUP from the drain on: there is nothing left to reload, and once
    asyncio's handlers are gone its default action would kill the process
    mid-exit (a SIGHUP storm during a drain ended it by signal 6 times in 6)."""
    asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def _serve(
    config: Config,
    config_path: Path | None,
    overrides: Mapping[str, Any],
    port_file: Path | None,
) -> int:
    running = await _start(config, config_path, overrides)
    stop = _Stop()
    trimmer = Trimmer()
    tasks = _on_signals(running, stop, trimmer)
    logger.info("%s", _summary(config))
    if not config.models:
        logger.warning("no model rules are configured: the guard only proxies, and guards nothing")
    logger.info(
        "serving gRPC on port %d, metrics on port %d", running.server.port, running.metrics_port
    )
    if running.rest is not None:
        logger.info("serving REST on port %d", running.rest.port)
    # Everything allocated so far (modules, descriptors, the server) lives as
    # long as the process: move it out of the collector's sight, so the full
    # collections that steady traffic triggers scan only what requests made
    # (measured: ~23 ms per full collection of a fresh guard otherwise).
    gc.collect()
    gc.freeze()
    # glibc keeps what the start freed (config parsing, descriptors, garbage
    # just collected) until a spike makes the trimmer act: return it now
    # (about 0.5 MB of an idle guard's RSS).
    trimmer.trim_now()
    heartbeat = _announce(port_file, running)
    try:
        await stop.event.wait()
        _ignore_reloads()
        for task in tasks:
            task.cancel()
        logger.info(
            "stopping: refusing new calls, draining in-flight calls for up to %.1f s",
            config.shutdown_grace_s,
        )
        await running.stop()
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
        running.httpd.shutdown()
        running.httpd.server_close()
    if stop.fatal:
        logger.critical("exiting: %s", stop.fatal)
        return 1
    logger.info("stopped")
    return 0


def run_serve(
    config: Config,
    config_path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    port_file: Path | None = None,
    dev_models: Sequence[str] = (),
) -> int:
    """Run the guard until SIGTERM/SIGINT. Returns the process exit code.

    ``overrides`` are the settings flags and environment variables gave; a
    reload applies them over the file again.
    """
    if not tune_malloc():
        logger.info("allocator tuning unavailable (not glibc); large responses cost page faults")
    if kernels.MISSING:
        logger.info(
            "native modules not built (%s): responses are guarded with protobuf and numpy "
            "alone, at more CPU per response; install with a C compiler present to build them",
            ", ".join(kernels.MISSING),
        )
    overrides = dict(overrides or {})
    with contextlib.ExitStack() as stack:
        if dev_models:
            upstream, rest = stack.enter_context(_dev_backend(dev_models, config.max_message_mb))
            overrides["upstream"] = upstream
            overrides.setdefault("rest_upstream", config.rest_upstream or rest)
            config = replace(config, upstream=upstream, rest_upstream=overrides["rest_upstream"])
        elif config.upstream is None:
            raise ConfigError(
                f"{config.source}: field 'upstream' is not set; give the TF Serving address, "
                "or --model NAME=BASE_PATH to start the local backend"
            )
        raise_descriptor_limit(config)
        return asyncio.run(_serve(config, config_path, overrides, port_file))


def configure_logging(level: str) -> None:
    """One line per event, to stderr; a warning or error that repeats, at most
    once a minute (:class:`RepeatQuota`)."""
    before = set(logging.getLogger().handlers)
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Only the handler made here: one already there (pytest's capture, an
    # embedding program's) keeps every record.
    for handler in set(logging.getLogger().handlers) - before:
        handler.addFilter(RepeatQuota())


class RepeatQuota(logging.Filter):
    """Lets a warning or error through once per ``every_s`` for each place that
    logs it (logger and message template), plus up to ``distinct_max - 1``
    lines of other text from that place in the same window (two different
    reload failures a few seconds apart are both shown); the next one that
    passes says how many were left out. Hostile traffic can make some lines
    repeat on every call: 1,578 method names that were not UTF-8 a second
    wrote 333 KiB/s of errors (27 GiB a day, a container's disk). On the
    handler, not the logger: what listens on a logger still sees every record."""

    def __init__(self, every_s: float = 60.0, places_max: int = 256, distinct_max: int = 4) -> None:
        super().__init__()
        self._every_s = every_s
        self._places_max = places_max
        self._distinct_max = distinct_max
        self._windows: dict[tuple[str, str], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        place = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        window = self._windows.get(place)
        if window is not None and now < window.due:
            text = _text(record)
            if text in window.seen or len(window.seen) >= self._distinct_max:
                window.left_out += 1
                return False
            window.seen.add(text)
            return True
        if len(self._windows) >= self._places_max:
            self._windows.clear()
        self._windows[place] = _Window(now + self._every_s, {_text(record)})
        if window is not None and window.left_out:
            record.msg = (
                f"{record.msg} ({window.left_out} more like it in the last minute left out)"
            )
        return True


@dataclass(slots=True)
class _Window:
    """One place's minute: when it ends, the texts shown, how many were not."""

    due: float
    seen: set[str]
    left_out: int = 0


def _text(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()[:500]
    except (TypeError, ValueError):  # arguments that do not fit: logging reports it later
        return str(record.msg)[:500]
