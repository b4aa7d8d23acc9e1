"""The atheris targets against the native modules built with AddressSanitizer
and UBSan: memory errors and undefined behaviour on hostile upstream bytes.

Run: ``python -m tests.fuzz.asan [libFuzzer flags]`` (``make fuzz-asan``), after
``pip install atheris``; it needs gcc and Python's headers, as the install does.

The modules are compiled with gcc into a scratch copy of the ``guard`` package,
which the targets import first (the check below makes sure). They are not
linked to gcc's sanitizer runtime: their sanitizer calls bind to the one
atheris ships with libFuzzer (``asan_with_fuzzer.so``), preloaded, as two
ASan runtimes in one process do not work and libFuzzer's coverage needs its
own. A module that loads at all has found that runtime, so it is
instrumented. Any report stops the run with a nonzero exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("tests.fuzz.fuzz_wire", "tests.fuzz.fuzz_rest")
ARTIFACTS = REPO / ".cache" / "fuzz-asan"
MODULES = ("_rank", "_walk")
CFLAGS = (
    "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
    "-g", "-O1", "-fno-trapping-math", "-fPIC",
)  # fmt: skip
OPTIONS = {
    # Allocations the data plane refuses are still attempted by numpy in
    # some paths: fail them rather than let ASan's shadow take the box.
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:"
    "max_allocation_size_mb=1024",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def build(into: Path) -> None:
    """The ``guard`` package under ``into``, its modules sanitized."""
    shutil.copytree(
        REPO / "guard", into / "guard", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for name in MODULES:
        source = REPO / "guard" / "dataplane" / f"{name}.c"
        obj = into / f"{name}.o"
        subprocess.run(
            ["gcc", *CFLAGS, "-I", include, "-c", str(source), "-o", str(obj)], check=True
        )
        target = into / "guard" / "dataplane" / f"{name}{suffix}"
        subprocess.run(["gcc", "-shared", str(obj), "-o", str(target)], check=True)


def environment(into: Path) -> dict[str, str]:
    import atheris

    runtime = Path(atheris.__file__).parent.parent / "asan_with_fuzzer.so"
    if not runtime.is_file():
        raise SystemExit(f"atheris has no {runtime.name} beside it ({runtime.parent})")
    path = os.pathsep.join([str(into), str(REPO)])
    return {**os.environ, **OPTIONS, "PYTHONPATH": path, "LD_PRELOAD": str(runtime)}


def check_imports(into: Path, env: dict[str, str]) -> None:
    """The targets import the sanitized modules, not the installed ones."""
    names = ", ".join(f"guard.dataplane.{name}" for name in MODULES)
    code = f"import {names}; print(*[m.__file__ for m in ({names})])"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ARTIFACTS, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    files = out.stdout.split()
    if len(files) != len(MODULES) or not all(f.startswith(str(into)) for f in files):
        raise SystemExit(f"the targets would import {files}, not the modules built in {into}")


def main(flags: list[str]) -> int:
    # The working directory comes first on a target's path: not the checkout,
    # whose guard/ holds the uninstrumented modules. libFuzzer leaves its
    # crash-* files there.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="guard-asan-") as tmp:
        into = Path(tmp)
        build(into)
        env = environment(into)
        check_imports(into, env)
        for target in TARGETS:
            print(f"== {target} (AddressSanitizer, UBSan)", flush=True)
            code = subprocess.run([sys.executable, "-m", target, *flags], env=env, cwd=ARTIFACTS)
            if code.returncode:
                return code.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
