"""``guard models build DIR``: build the seed SavedModels (TensorFlow imported lazily)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``build`` sub-command to the ``guard models`` parser."""
    commands = parser.add_subparsers(dest="models_command", metavar="COMMAND")
    commands.required = True
    build = commands.add_parser(
        "build",
        help="build the seed SavedModels into DIR (cached: a second run is instant)",
        description="Write the seed models (wide_deep, binary_mlp, softmax_201 and "
        "softmax_201_untrained) as SavedModels in TF Serving's layout "
        "DIR/<name>/1/saved_model.pb, deterministically.",
    )
    build.add_argument("dir", metavar="DIR", type=Path, help="output directory")
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")


def run(args: argparse.Namespace) -> int:
    """Run ``guard models build``; return the process exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from guard.dev.models import build_models

    started = time.monotonic()
    try:
        paths = build_models(args.dir, force=args.force)
    except OSError as exc:
        print(f"guard models build: cannot write {args.dir}: {exc}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}={path}")
    logging.getLogger(__name__).info("models ready in %.1f s", time.monotonic() - started)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m guard.dev.models``."""
    parser = argparse.ArgumentParser(prog="python -m guard.dev.models")
    add_arguments(parser)
    return run(parser.parse_args(argv))
