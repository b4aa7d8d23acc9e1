"""Builds the one native module, ``guard._rank`` (everything else is in pyproject.toml).

The module is the clean path of an output rule in one call (see guard/fastlane.py).
It is optional: without a C compiler the install still succeeds, and the guard
runs its numpy path alone; ``guard serve`` logs which one it uses.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "guard._rank",
            sources=["guard/_rank.c"],
            optional=True,
            extra_compile_args=["-O3"],
        )
    ]
)
