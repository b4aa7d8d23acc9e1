"""Builds the native modules (everything else is in pyproject.toml).

- ``guard.dataplane._rank``: the clean path of an output rule in one call;
- ``guard.dataplane._walk``: the layout of a PredictResponse read in place, and
  the numbers of a REST predict response's text and the text of its derived
  outputs.

Both are optional: without a C compiler the install still succeeds, and the
guard runs on protobuf and numpy alone; ``guard serve`` logs which it uses.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            f"guard.dataplane.{name}",
            sources=[f"guard/dataplane/{name}.c"],
            optional=True,
            # No trapping math: lets the entropy's log vectorise (both sides of a
            # select are computed); the guard never reads floating-point traps.
            extra_compile_args=["-O3", "-fno-trapping-math"],
        )
        for name in ("_rank", "_walk")
    ]
)
