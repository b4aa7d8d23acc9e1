"""CLI glue for ``guard demo`` (imports TensorFlow only inside :func:`run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[3]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``guard demo``."""
    parser.add_argument(
        "--config",
        type=Path,
        default=_REPO_ROOT / "examples" / "guard.yaml",
        help="guard config for the four seed models (default: examples/guard.yaml)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=_REPO_ROOT / ".cache" / "models",
        help="where the seed models are built and cached",
    )
    parser.add_argument("--tensor-content", action="store_true",
                        help="the backend answers in tensor_content, not typed *_val")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from guard.dev.demo.run import run_demo

    try:
        return run_demo(args.config, args.models_dir, args.tensor_content)
    except KeyboardInterrupt:
        print("\nguard demo: interrupted; children stopped")
        return 130
