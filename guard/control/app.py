"""Running the guard: metrics endpoint, gRPC server, signals, reload, dev mode."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from guard._version import __version__
from guard.control.config import Config, load_config
from guard.control.files import file_identity
from guard.dataplane import kernels
from guard.dataplane.errors import ConfigError
from guard.metrics.guard_metrics import GuardMetrics
from guard.server.proxy import GuardServer

__all__ = ["run_serve", "split_address"]

logger = logging.getLogger("guard")


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def tune_malloc() -> bool:
    """Keep response-sized buffers on the heap instead of fresh ``mmap`` pages.

    glibc serves allocations over its mmap threshold (128 KiB at first) with
    new mappings, so every large response costs page faults on zeroed pages.
    Measured on a 1024x201 response: 4.1 ms per guarded response before, 1.1 ms
    after. A fixed threshold of 32 MiB (glibc's maximum on 64-bit) keeps
    megabyte buffers reusable; freed memory is returned past 64 MiB. Returns
    whether the allocator accepted the settings (not glibc: no-op).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        and mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)
    )


def _write_port_file(path: Path, ports: dict[str, int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ports), encoding="utf-8")
    tmp.replace(path)  # atomic: a reader never sees half a file


def _summary(config: Config) -> str:
    rules = sum(len(m.outputs) for m in config.models)
    models = ", ".join(f"{m.name}/{m.signature}" for m in config.models) or "none"
    return (
        f"guard {__version__}: listen={config.listen} upstream={config.upstream} "
        f"metrics={config.metrics_listen} timeout={config.default_timeout_s}s "
        f"max_message_mb={config.max_message_mb} "
        f"max_concurrent_rpcs={config.max_concurrent_rpcs} "
        f"tls={'on' if config.tls else 'off'} models=[{models}] output_rules={rules}"
    )


@contextlib.contextmanager
def _dev_backend(models: Sequence[str], max_message_mb: int) -> Iterator[str]:
    """Start ``guard backend`` as a child process and yield its address."""
    from guard.dev.backend import start_backend
    from guard.dev.backend.cli import parse_model_args

    logger.info("dev mode: starting the local backend for %s", ", ".join(models))
    with start_backend(parse_model_args(list(models)), max_message_mb=max_message_mb) as backend:
        logger.info("dev mode: local backend serving on %s", backend.address)
        yield backend.address


class _Reloader:
    """Reloads the config file on SIGHUP or when the file changes; a bad file
    keeps the old rules."""

    def __init__(self, server: GuardServer, path: Path | None) -> None:
        self._server = server
        self._path = path
        self._identity = file_identity((path,)) if path else None
        # Settings the running config took from flags, env vars or dev mode rather
        # than the file: a reload keeps them, as a restart with the same flags would.
        self._overridden: dict[str, Any] = {}
        if path is not None:
            try:
                from_file = load_config(path)
            except ConfigError:
                from_file = server.config
            self._overridden = {
                name: getattr(server.config, name)
                for name in _restart_only_changes(from_file, server.config)
            }

    async def watch(self, interval_s: float = 1.0) -> None:
        """Poll the file (through symlinks) and reload when it changes."""
        if self._path is None:
            return
        while True:
            await asyncio.sleep(interval_s)
            identity = file_identity((self._path,))
            if identity is not None and identity != self._identity:
                logger.info("config file %s changed", self._path)
                self.reload()

    def reload(self) -> bool:
        """Load the file again and swap the rules in. Returns whether it worked."""
        if self._path is None:
            logger.warning("reload requested but the guard runs without a config file")
            return False
        self._identity = file_identity((self._path,))
        try:
            new = load_config(self._path)
        except ConfigError as exc:
            self._server.metrics.config_reloads.labels("failure").inc()
            logger.error("config reload failed, keeping the previous rules: %s", exc)
            return False
        except Exception as exc:  # e.g. a file that is not UTF-8: never kill the watcher
            self._server.metrics.config_reloads.labels("failure").inc()
            logger.error(
                "config reload failed, keeping the previous rules: %s: cannot load: %s: %s",
                self._path, type(exc).__name__, exc,
            )  # fmt: skip
            return False
        new = replace(new, **self._overridden)
        restart_only = _restart_only_changes(self._server.config, new)
        if restart_only:
            logger.warning(
                "config reload: %s changed; these take effect only after a restart, "
                "the rules take effect now", ", ".join(restart_only),
            )  # fmt: skip
        self._server.swap_rules(new)
        self._server.metrics.config_reloads.labels("success").inc()
        logger.info("config reloaded: %s", _summary(new))
        return True


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """Top-level settings a reload cannot apply (only ``models`` swaps live)."""
    return [
        f.name
        for f in fields(Config)
        if f.name not in ("models", "source") and getattr(old, f.name) != getattr(new, f.name)
    ]


async def _serve(config: Config, config_path: Path | None, port_file: Path | None) -> int:
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry, config.model_names(), config.max_class_label_values)
    for result in ("success", "failure"):
        metrics.config_reloads.labels(result)
    host, port = split_address(config.metrics_listen)
    httpd, _thread = start_http_server(port, host, registry=registry)
    server = GuardServer(config, metrics)
    grpc_port = await server.start()
    metrics_port = httpd.server_port
    # Signal handlers before the port file: whoever waits for that file may
    # send SIGTERM at once, and it must drain, not kill.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloader = _Reloader(server, config_path)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reloader.reload)
    watcher = asyncio.create_task(reloader.watch(), name="guard-config-watch")
    logger.info("%s", _summary(config))
    logger.info("serving gRPC on port %d, metrics on port %d", grpc_port, metrics_port)
    # Everything allocated so far (modules, descriptors, the server) lives as
    # long as the process: move it out of the collector's sight, so the full
    # collections that steady traffic triggers scan only what requests made
    # (measured: ~23 ms per full collection of a fresh guard otherwise).
    gc.collect()
    gc.freeze()
    if port_file is not None:
        _write_port_file(port_file, {"grpc": grpc_port, "metrics": metrics_port})
    try:
        await stop.wait()
        watcher.cancel()
        logger.info(
            "stopping: refusing new calls, draining in-flight calls for up to %.1f s",
            config.shutdown_grace_s,
        )
        await server.stop()
    finally:
        httpd.shutdown()
        httpd.server_close()
    logger.info("stopped")
    return 0


def run_serve(
    config: Config,
    config_path: Path | None = None,
    port_file: Path | None = None,
    dev_models: Sequence[str] = (),
) -> int:
    """Run the guard until SIGTERM/SIGINT. Returns the process exit code."""
    if not tune_malloc():
        logger.info("allocator tuning unavailable (not glibc); large responses cost page faults")
    missing = kernels.MISSING
    if missing:
        logger.info(
            "native modules not built (%s): responses are guarded with protobuf and numpy "
            "alone, at more CPU per response; install with a C compiler present to build them",
            ", ".join(missing),
        )
    stack = contextlib.ExitStack()
    try:
        if dev_models:
            upstream = stack.enter_context(_dev_backend(dev_models, config.max_message_mb))
            config = replace(config, upstream=upstream)
        elif config.upstream is None:
            raise ConfigError(
                f"{config.source}: field 'upstream' is not set; give the TF Serving address, "
                "or --model NAME=BASE_PATH to start the local backend"
            )
        return asyncio.run(_serve(config, config_path, port_file))
    finally:
        stack.close()


def configure_logging(level: str) -> None:
    """One line per event, to stderr."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
