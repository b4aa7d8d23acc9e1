"""Command line: ``guard serve | check | backend | models | demo | baseline``.

This module imports nothing heavy: ``guard backend``, ``guard models`` and
``guard demo`` import TensorFlow only inside their own ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from guard._version import __version__
from guard.control.config import overrides_from, resolve, settings
from guard.control.preflight import (
    CannotStart,
    backend_listeners,
    check_distinct,
    check_port_file,
    check_tempdir,
    serve_listeners,
    start,
)
from guard.dataplane.errors import ConfigError

__all__ = ["main"]

# Subcommands that live in their own packages (they import TensorFlow lazily).
_PLUGINS = {
    "backend": (
        "guard.dev.backend.cli",
        "serve SavedModels over TF Serving's gRPC API (needs [tensorflow])",
    ),
    "models": ("guard.dev.models.cli", "build the seed models (needs [tensorflow])"),
    "demo": ("guard.dev.demo.cli", "build models, start backend + guard, show guarded outputs"),
    "baseline": (
        "guard.control.baseline",
        "write an output's confidence distribution as a drift baseline (YAML)",
    ),
}


_WORKERS_ENV = "GUARD_WORKERS"
# Set by the --workers supervisor for its workers: its process id.
_SUPERVISOR_ENV = "GUARD_SUPERVISOR_PID"
# Each worker is a process of about 60 MB, and more of them than cores add no
# throughput; the bound keeps a typo (--workers 100000) from forking until
# memory runs out.
_WORKERS_MAX = 64


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the guard in front of TF Serving",
        description="Run the guard: a TF-Serving-compatible gRPC proxy that applies output rules. "
        "Flags override environment variables, which override the config file.",
    )
    p.add_argument(
        "--config",
        default=os.environ.get("GUARD_CONFIG"),
        help="YAML config file (env GUARD_CONFIG); without one the guard only proxies",
    )
    for name, setting in settings():
        if setting.flag is not None:
            env = f"; env {setting.env}" if setting.env else ""
            p.add_argument(setting.flag, dest=name, help=f"{setting.help} Overrides '{name}'{env}.")
    p.add_argument(
        "--port-file",
        type=Path,
        help='once serving, write {"grpc": PORT, "metrics": PORT} here as JSON',
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=BASE_PATH",
        help="dev mode: start the local backend with this model and proxy to it "
        "(repeatable; needs [tensorflow]; ignores 'upstream')",
    )
    # GUARD_WORKERS is read by the serve command itself (_workers), not here:
    # a bad value must be a config error of `guard serve`, not break every command.
    p.add_argument("--workers", type=int, default=None,
                   help="run N guard processes on one port (SO_REUSEPORT) with one aggregated "
                        "/metrics endpoint (env GUARD_WORKERS; default 1, at most "
                        f"{_WORKERS_MAX})")  # fmt: skip
    # Set by the --workers supervisor on its workers: their siblings listen on
    # the port, and it checked the port is no one else's before starting them.
    p.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)


def _add_check(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="validate a config (exit 0 if valid, 2 if not)",
        description="Validate a config file. With --upstream, also check each configured "
        "model's outputs against the signatures the upstream reports.",
    )
    p.add_argument("--config", default=os.environ.get("GUARD_CONFIG"), required=False)
    p.add_argument("--upstream", help="TF Serving address to check the rules against")


# numpy's OpenBLAS starts a thread per core when it loads, and keeps them; no
# guard command does heavy linear algebra (rules are elementwise), so one is
# enough.
_BLAS_THREADS = "OPENBLAS_NUM_THREADS"


def _load_numpy_single_threaded() -> None:
    """Load numpy with one OpenBLAS thread, unless the environment chose a
    number. Set for the import only: processes a command starts (the dev
    backend) keep their own default."""
    if _BLAS_THREADS in os.environ or "numpy" in sys.modules:
        return
    os.environ[_BLAS_THREADS] = "1"
    try:
        importlib.import_module("numpy")
    finally:
        del os.environ[_BLAS_THREADS]


def _cmd_serve(args: argparse.Namespace) -> int:
    # gRPC core writes its own error lines to stderr, one per malformed
    # stream (a bad grpc-timeout, an unknown grpc-encoding), outside the
    # guard's log quota: one client wrote 2.7 MiB of log a second. The client
    # gets the error; set GRPC_VERBOSITY=ERROR to see them here too.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from guard.control.app import configure_logging, run_serve

    overrides = overrides_from(os.environ, vars(args))
    cfg = resolve(args.config, overrides)
    workers = _workers(args.workers)
    configure_logging(cfg.log_level)
    if args.model:
        from guard.dev.backend.cli import ModelArgumentError, parse_model_args

        try:
            parse_model_args(args.model)
        except ModelArgumentError as exc:
            raise ConfigError(str(exc)) from None
    config_path = Path(args.config) if args.config else None
    if workers > 1 and args.model:
        raise ConfigError("--workers cannot be combined with --model (dev mode)")
    if workers > 1 or args.model:
        check_tempdir()  # the children's port files go there
    if args.as_worker and os.environ.get(_SUPERVISOR_ENV) != str(os.getppid()):
        raise CannotStart(
            "--as-worker is for the processes `guard serve --workers N` starts (it skips the "
            "check that no other process listens on the port); leave it out"
        )
    check_port_file(args.port_file)
    listeners = serve_listeners(cfg, dev_mode=bool(args.model), worker=args.as_worker)
    if workers > 1:
        from guard.control.workers import run_workers

        # The workers are `guard serve` too, with this environment: were it
        # left, each would start workers of its own, and so on.
        os.environ.pop(_WORKERS_ENV, None)
        os.environ[_SUPERVISOR_ENV] = str(os.getpid())  # their --as-worker is genuine
        run = partial(run_workers, cfg, args.config, overrides, workers, args.port_file)
    else:
        run = partial(run_serve, cfg, config_path, overrides, args.port_file, args.model)
    return start(listeners, cfg.tls is not None, run)


def _workers(flag: int | None) -> int:
    """How many guard processes: ``--workers``, else ``GUARD_WORKERS``, else 1."""
    origin, value = "--workers ", flag
    if value is None:
        raw = os.environ.get(_WORKERS_ENV, "").strip()
        if not raw:
            return 1  # unset or empty, as for the other GUARD_ variables
        origin = f"{_WORKERS_ENV}="
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(
                f"{_WORKERS_ENV}={raw[:40]!r}: not a whole number; give a whole number from 1 "
                f"to {_WORKERS_MAX} (guard processes sharing the port), or unset it for one"
            ) from None
    if not 1 <= value <= _WORKERS_MAX:
        raise ConfigError(f"{origin}{value}: give a whole number from 1 to {_WORKERS_MAX}")
    return value


def _cmd_check(args: argparse.Namespace) -> int:
    if not args.config:
        print("guard check: give --config FILE (or set GUARD_CONFIG)", file=sys.stderr)
        return 2
    # What serve would run: the file, then the GUARD_* environment; --upstream
    # is read as the setting is (HOST:PORT).
    cfg = resolve(args.config, overrides_from(os.environ, {"upstream": args.upstream}))
    check_distinct(serve_listeners(cfg, dev_mode=False))  # binds nothing: the guard may be up
    rules = sum(len(m.outputs) for m in cfg.models)
    print(f"{args.config}: valid ({len(cfg.models)} model rules, {rules} output rules)")
    if args.upstream and cfg.upstream:
        from guard.control.check import check_against_upstream

        findings = check_against_upstream(cfg, cfg.upstream)
        for finding in findings:
            print(finding)
        if findings:
            print(f"{len(findings)} problems against {args.upstream}", file=sys.stderr)
            return 2
        print(f"all configured outputs exist and are floating point on {args.upstream}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``guard`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="guard",
        description="An output guard for TensorFlow Serving: validates, repairs and labels "
        "model outputs behind TF Serving's own gRPC API.",
    )
    parser.add_argument("--version", action="version", version=f"guard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(sub)
    _add_check(sub)
    for name, (module, help_text) in _PLUGINS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(plugin=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError:
            p.set_defaults(plugin_missing=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``guard`` console script."""
    _load_numpy_single_threaded()  # before the plugins' parsers import it
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(parser, args)
    except ConfigError as exc:
        print(f"guard: config error:\n{exc}", file=sys.stderr)
        return 2
    except CannotStart as exc:
        print(f"guard {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _cmd_serve(args)
    if args.command == "check":
        return _cmd_check(args)
    if not getattr(args, "plugin", None):
        parser.print_help()
        return 2
    if getattr(args, "plugin_missing", False):
        print(f"guard {args.command}: not available in this install", file=sys.stderr)
        return 2
    plugin = importlib.import_module(args.plugin)
    if args.command == "backend":  # before it loads TensorFlow and the models
        check_port_file(args.port_file)
        return start(backend_listeners(args), False, lambda: int(plugin.run(args)))
    code: int = plugin.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
