"""``guard backend``: serve SavedModels over TF Serving's gRPC API.

This module stays TensorFlow-free; :func:`run` imports the server lazily.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:8510"
DEFAULT_MAX_MESSAGE_MB = 256


class ModelArgumentError(ValueError):
    """A ``--model`` argument that cannot be served."""


def parse_model_args(values: list[str]) -> dict[str, Path]:
    """Turn ``NAME=BASE_PATH`` strings into a name -> base path map, checking each."""
    models: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ModelArgumentError(f"--model {value!r}: expected NAME=BASE_PATH")
        if name in models:
            raise ModelArgumentError(f"--model {value!r}: model {name!r} given twice")
        base = Path(path).expanduser().resolve()
        if not base.is_dir():
            raise ModelArgumentError(
                f"--model {value!r}: base path {base} is not a directory "
                "(expected BASE_PATH/<version>/saved_model.pb)"
            )
        if not any(child.is_dir() and child.name.isdigit() for child in base.iterdir()):
            raise ModelArgumentError(
                f"--model {value!r}: no version directory under {base} "
                "(expected BASE_PATH/<version>/saved_model.pb, e.g. BASE_PATH/1/)"
            )
        models[name] = base
    return models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``guard backend`` arguments to ``parser``."""
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=BASE_PATH",
        help="serve the SavedModels under BASE_PATH/<version>/ as NAME (repeatable)",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="ADDR",
        help=f"gRPC address to listen on (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    parser.add_argument(
        "--rest-listen",
        metavar="ADDR",
        help="also serve TF Serving's REST API on ADDR (e.g. 127.0.0.1:8501; port 0 picks "
        'a free one); the port file then holds {"grpc": P, "rest": Q}',
    )
    parser.add_argument(
        "--tensor-content",
        action="store_true",
        help="answer with tensor_content instead of typed *_val fields (TF Serving's default)",
    )
    parser.add_argument(
        "--port-file",
        type=Path,
        metavar="PATH",
        help="once serving, write the bound port number to PATH (atomically); "
        "with --rest-listen, a JSON object of both ports",
    )
    parser.add_argument(
        "--max-message-mb",
        type=int,
        default=DEFAULT_MAX_MESSAGE_MB,
        metavar="MB",
        help=f"largest request/response in MiB (default {DEFAULT_MAX_MESSAGE_MB})",
    )


def run(args: argparse.Namespace) -> int:
    """Run the backend until SIGINT/SIGTERM; return the exit code (2 for bad arguments)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        models = parse_model_args(args.model)
    except ModelArgumentError as exc:
        print(f"guard backend: {exc}", file=sys.stderr)
        return 2
    if args.max_message_mb <= 0:
        print("guard backend: --max-message-mb must be a positive integer", file=sys.stderr)
        return 2
    # TensorFlow's C++ INFO lines drown the backend's own log; keep warnings.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from guard.dev.backend.server import ServeOptions, run_server

    return run_server(
        ServeOptions(
            models=models,
            listen=args.listen,
            tensor_content=args.tensor_content,
            port_file=args.port_file,
            max_message_mb=args.max_message_mb,
            rest_listen=args.rest_listen,
        )
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m guard.dev.backend``."""
    parser = argparse.ArgumentParser(
        prog="python -m guard.dev.backend",
        description="Serve SavedModels over TensorFlow Serving's gRPC API.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
