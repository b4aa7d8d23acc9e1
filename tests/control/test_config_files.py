"""Files a config points to (labels files, the config itself, TLS files) and
the config file as it changes: special files are refused without blocking,
labels files are read once and counted, their content is one label per line,
and a file being rewritten is not applied half-written."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guard.control import rules_config
from guard.control.config import Config, load_config, resolve
from guard.control.files import FileTooLargeError, FileWatcher, check_bounded, read_bounded
from guard.control.reload import Reloader
from guard.dataplane.errors import ConfigError
from tests.support.guard import start_in_process, write_atomic

REPO = Path(__file__).resolve().parents[2]
WHERE = "models[0] (model 'm') outputs[0] (output 'p')"


def _rules(*labels_files: str, upstream: str = "127.0.0.1:1") -> str:
    models = "".join(
        f"  - {{name: m{i or ''}, outputs: [{{name: p, argmax: true, labels_file: '{f}'}}]}}\n"
        for i, f in enumerate(labels_files)
    )
    return f"upstream: {upstream}\nlisten: 127.0.0.1:0\nmodels:\n{models}"


def _release(path: Path) -> None:
    """Open ``path`` for writing and close it: a reader blocked in open() gets EOF."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: no reader waits
        pass


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO with no writer. Every 15 s, and at the end, whatever waits to read
    it is released, so that a regression fails its time bound instead of hanging."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    done = threading.Event()

    def release_now_and_then() -> None:
        while not done.wait(15):
            _release(path)

    releaser = threading.Thread(target=release_now_and_then, daemon=True)
    releaser.start()
    yield path
    done.set()
    releaser.join()
    _release(path)


# ----------------------------------------------------------- special files


def test_special_files_are_refused_by_what_they_are(tmp_path: Path, fifo: Path) -> None:
    (tmp_path / "dir").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        cases = {
            fifo: "a FIFO (named pipe)",
            tmp_path / "dir": "a directory",
            Path("/dev/null"): "a character device",
            tmp_path / "sock": "a socket",
        }
        for path, kind in cases.items():
            for call in (read_bounded, check_bounded):
                started = time.monotonic()
                with pytest.raises(FileTooLargeError) as err:
                    call(path, 1024)
                assert str(err.value) == f"'{path}' is {kind}, not a regular file"
                assert time.monotonic() - started < 5
    finally:
        sock.close()
    (tmp_path / "ok").write_bytes(b"12345")
    assert read_bounded(tmp_path / "ok", 5) == b"12345"
    with pytest.raises(FileTooLargeError, match="larger than the 4-byte limit"):
        read_bounded(tmp_path / "ok", 4)


# Refusing takes a process start (~0.5 s); the bound leaves room for a loaded
# machine, and stays below the FIFO fixture's release (15 s) and the timeout.
CHECK_SECONDS = 10


def _check(config: Path) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "guard", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=20, cwd=REPO,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def test_check_refuses_a_fifo_labels_file_at_once(tmp_path: Path, fifo: Path) -> None:
    """Found: open() of a FIFO with no writer never returned; `guard check` hung."""
    config = tmp_path / "guard.yaml"
    config.write_text(_rules(str(fifo)))
    rc, output, seconds = _check(config)
    assert rc == 2, output
    assert f"{WHERE}: field 'labels_file': '{fifo}' is a FIFO (named pipe)" in output
    assert "Traceback" not in output and seconds < CHECK_SECONDS, (seconds, output)


def test_check_refuses_a_fifo_config_file_at_once(fifo: Path) -> None:
    rc, output, seconds = _check(fifo)
    assert rc == 2, output
    assert f"{fifo}: cannot read the config file: '{fifo}' is a FIFO (named pipe)" in output
    assert "Traceback" not in output and seconds < CHECK_SECONDS, (seconds, output)


async def test_a_reload_into_a_fifo_labels_file_fails_and_the_next_one_applies(
    tmp_path: Path, fifo: Path
) -> None:
    """Found: the reload's thread blocked in open() holding the reload lock:
    no later reload ever applied, and SIGTERM could not end the process."""
    (tmp_path / "a.txt").write_text("a\nb\n")
    (tmp_path / "c.txt").write_text("c\nd\n")
    config = tmp_path / "guard.yaml"
    config.write_text(_rules("a.txt"))
    guard = await start_in_process(load_config(config))
    counted: list[str] = []
    reloader = Reloader(
        config, {}, lambda: guard.server.config, guard.server.swap_rules, counted.append
    )
    try:
        config.write_text(_rules(str(fifo)))
        assert await asyncio.wait_for(reloader.reload(), CHECK_SECONDS) is False
        assert counted == ["failure"]
        assert guard.server.config.models[0].outputs[0].labels == ("a", "b")
        config.write_text(_rules("c.txt"))
        assert await asyncio.wait_for(reloader.reload(), CHECK_SECONDS) is True
        assert counted == ["failure", "success"]
        assert guard.server.config.models[0].outputs[0].labels == ("c", "d")
    finally:
        await guard.stop()


# ---------------------------------------------------- labels files: amount


def _many_rules(tmp_path: Path, files: list[str]) -> Path:
    config = tmp_path / "guard.yaml"
    config.write_text(
        "upstream: 127.0.0.1:1\nmodels:\n"
        + "".join(
            f"  - {{name: m{i}, outputs: [{{name: p, argmax: true, labels_file: {f}}}]}}\n"
            for i, f in enumerate(files)
        )
    )
    return config


def test_rules_sharing_a_labels_file_share_one_copy(tmp_path: Path) -> None:
    """Found: 80 rules naming one 100,000-label file read it 80 times: a
    tracemalloc peak of 582 MiB here, 738 MB of RSS for `guard check`. Now 16 MiB."""
    labels = "".join(f"label_number_{i:06d}\n" for i in range(rules_config.LABELS_MAX))
    (tmp_path / "labels.txt").write_text(labels)
    config = _many_rules(tmp_path, ["labels.txt"] * 80)
    tracemalloc.start()
    try:
        cfg = load_config(config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    first = cfg.models[0].outputs[0].labels
    assert first is not None and len(first) == rules_config.LABELS_MAX
    assert all(m.outputs[0].labels is first for m in cfg.models)


def test_labels_files_of_one_config_are_counted_together(tmp_path: Path) -> None:
    per_file = rules_config.LABELS_MAX
    files = 1 + rules_config.LABELS_FILES_TOTAL_MAX // per_file
    names = [f"l{n}.txt" for n in range(files)]
    for n, name in enumerate(names):
        (tmp_path / name).write_text("".join(f"f{n}_{i}\n" for i in range(per_file)))
    config = _many_rules(tmp_path, [*names, names[0]])  # the first one again: counted once
    with pytest.raises(ConfigError) as err:
        load_config(config)
    message = str(err.value)
    last = files - 1
    assert message == (
        f"{config}: models[{last}] (model 'm{last}') outputs[0] (output 'p'): "
        f"field 'labels_file': '{tmp_path / names[last]}' has {per_file} labels, which would "
        f"bring the labels read from files in this config to {files * per_file}, more than "
        f"{rules_config.LABELS_FILES_TOTAL_MAX}; rules that name the same file share it and "
        "count it once"
    )
    # Within the budget: the same files load.
    assert len(load_config(_many_rules(tmp_path, [*names[:-1], names[0]])).models) == files


def test_a_bad_labels_file_is_reported_for_every_rule_naming_it(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("a\n\nb\n")
    with pytest.raises(ConfigError) as err:
        load_config(_many_rules(tmp_path, ["bad.txt", "./bad.txt"]))
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and all("line 2 is empty" in line for line in lines)
    assert "models[0] (model 'm0')" in lines[0] and "models[1] (model 'm1')" in lines[1]


def test_a_config_names_at_most_labels_files_max_files(tmp_path: Path) -> None:
    """Each labels file is polled every second: their number is bounded."""
    most = rules_config.LABELS_FILES_MAX
    names = [f"l{n}.txt" for n in range(most + 1)]
    for name in names:
        (tmp_path / name).write_text("a\n")
    config = _many_rules(tmp_path, [*names[:most], "./l0.txt", names[most]])
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert str(err.value) == (
        f"{config}: models[{most + 1}] (model 'm{most + 1}') outputs[0] (output 'p'): "
        f"field 'labels_file': '{tmp_path / names[most]}' would be labels file number "
        f"{most + 1} of this config, more than {most}; rules with the same labels can name "
        "the same file"
    )
    loaded = load_config(_many_rules(tmp_path, [*names[:most], "./l0.txt"]))
    assert loaded.labels_files == tuple(tmp_path / name for name in names[:most])


# --------------------------------------------------- labels files: content


@pytest.mark.parametrize(
    ("content", "labels"),
    [
        (b"\xef\xbb\xbfcat\ndog\n", ("cat", "dog")),  # a BOM, as Windows editors write
        (b"cat\r\ndog\r\n", ("cat", "dog")),
        (b"cat\r\ndog", ("cat", "dog")),
        (b"cat\ndog\r", ("cat", "dog")),
        (b"  cat \n dog\n\n\n", ("cat", "dog")),
        (b"n01440764\ttench\nn01443537\tgoldfish\n", ("n01440764\ttench", "n01443537\tgoldfish")),
        ("caf\u00e9\n\u732b\n".encode(), ("caf\u00e9", "\u732b")),
    ],
)
def test_labels_file_lines(tmp_path: Path, content: bytes, labels: tuple[str, ...]) -> None:
    (tmp_path / "labels.txt").write_bytes(content)
    cfg = load_config(_many_rules(tmp_path, ["labels.txt"]))
    assert cfg.models[0].outputs[0].labels == labels


@pytest.mark.parametrize(
    ("content", "line", "char"),
    [
        (b"cat\nca\x00t\n", 2, "U+0000"),
        ("cat\x85dog\n".encode(), 1, "U+0085"),  # NEL: str.splitlines split here
        (b"cat\x0cdog\n", 1, "U+000C"),  # form feed: likewise
        ("a\nb\ncat\u2028dog\n".encode(), 3, "U+2028"),
        (b"cat\rdog\n", 1, "U+000D"),  # a lone carriage return
        (b"cat\x1b[31m\n", 1, "U+001B"),
        (b"cat\x7f\n", 1, "U+007F"),
        (b"cat\n\xef\xbb\xbfdog\n", 2, "U+FEFF"),  # two files concatenated
    ],
)
def test_labels_file_control_characters_are_refused(
    tmp_path: Path, content: bytes, line: int, char: str
) -> None:
    path = tmp_path / "labels.txt"
    path.write_bytes(content)
    config = _many_rules(tmp_path, ["labels.txt"])
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert str(err.value) == (
        f"{config}: models[0] (model 'm0') outputs[0] (output 'p'): field 'labels_file': "
        f"'{path}' line {line} holds {char}; labels may hold tabs, but no other control "
        "character (U+0000-U+001F, U+007F-U+009F), line or paragraph separator "
        "(U+2028, U+2029) or byte order mark (U+FEFF)"
    )


# ------------------------------------------------ a config being rewritten


class _Calls:
    def __init__(self, taken: bool = True) -> None:
        self.count = 0
        self.taken = taken

    async def __call__(self) -> bool:
        self.count += 1
        return self.taken


async def test_the_watcher_waits_until_a_file_stops_changing(tmp_path: Path) -> None:
    path = tmp_path / "guard.yaml"
    path.write_text("x")
    calls = _Calls()
    watcher = FileWatcher([path], calls)
    await watcher.poll()
    assert calls.count == 0  # unchanged
    for n in range(5):  # written to on every poll: never acted on
        with path.open("a") as f:
            f.write("y" * (n + 1))
        await watcher.poll()
        assert calls.count == 0
    await watcher.poll()  # the same as at the poll before: acted on, once
    assert calls.count == 1
    await watcher.poll()
    await watcher.poll()
    assert calls.count == 1


async def test_the_watcher_offers_a_change_again_until_taken(tmp_path: Path) -> None:
    path = tmp_path / "guard.yaml"
    path.write_text("x")
    calls = _Calls(taken=False)
    watcher = FileWatcher([path], calls)
    path.write_text("xy")
    await watcher.poll()
    assert calls.count == 0
    await watcher.poll()
    await watcher.poll()
    assert calls.count == 2
    calls.taken = True
    await watcher.poll()
    await watcher.poll()
    assert calls.count == 3


async def test_a_watcher_waiting_for_a_file_to_settle_forgets_it_after_a_signal_reload(
    tmp_path: Path,
) -> None:
    path = tmp_path / "guard.yaml"
    path.write_text("x")
    calls = _Calls()
    watcher = FileWatcher([path], calls)
    path.write_text("xy")
    await watcher.poll()  # settling
    watcher.mark_seen()  # SIGHUP read it
    await watcher.poll()
    await watcher.poll()
    assert calls.count == 0


class _Applied:
    def __init__(self, first: Config) -> None:
        self.config = first
        self.counted: list[str] = []

    def apply(self, new: Config) -> None:
        self.config = new

    def reloader(self, path: Path) -> Reloader:
        return Reloader(path, {}, lambda: self.config, self.apply, self.counted.append)


def _threshold(threshold: str) -> str:
    return (
        "upstream: 127.0.0.1:1\nmodels:\n  - name: fraud\n    outputs:\n      - name: p\n"
        f"        labels: [ok, fraud]\n        threshold: {threshold}\n"
    )


def _applied_threshold(applied: _Applied) -> Any:
    return applied.config.models[0].outputs[0].threshold


async def test_a_config_changed_while_it_was_read_is_not_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found: a config truncated and rewritten in place was read half-written
    (``threshold: 0.`` of ``threshold: 0.95``, 0.0) and applied."""
    path = tmp_path / "guard.yaml"
    path.write_text(_threshold("0.5"))
    applied = _Applied(load_config(path))
    reloader = applied.reloader(path)

    def resolve_then_finish_writing(*args: Any) -> Config:
        config = resolve(*args)  # reads "threshold: 0."
        with path.open("a") as f:  # ... and the writer finishes meanwhile
            f.write("95\n")
        return config

    path.write_text(_threshold("0.")[:-1])
    monkeypatch.setattr("guard.control.reload.resolve", resolve_then_finish_writing)
    assert await reloader.reload() is False
    assert _applied_threshold(applied) == 0.5 and applied.counted == []
    monkeypatch.undo()
    await reloader.watcher.poll()  # the watcher saw the change: waits one poll
    assert _applied_threshold(applied) == 0.5
    await reloader.watcher.poll()
    assert _applied_threshold(applied) == 0.95 and applied.counted == ["success"]


async def test_a_signal_reload_reads_at_once_and_the_watcher_then_waits(tmp_path: Path) -> None:
    path = tmp_path / "guard.yaml"
    path.write_text(_threshold("0.5"))
    applied = _Applied(load_config(path))
    reloader = applied.reloader(path)
    path.write_text(_threshold("0.7"))
    await reloader.watcher.poll()
    assert _applied_threshold(applied) == 0.5  # the watcher waits one poll
    assert await reloader.reload() is True  # an operator's SIGHUP does not
    assert _applied_threshold(applied) == 0.7
    await reloader.watcher.poll()
    await reloader.watcher.poll()
    assert applied.counted == ["success"]  # and the watcher does not repeat it


# -------------------------------------------- labels files as they change


def _labels(applied: _Applied) -> tuple[str, ...] | None:
    return applied.config.models[0].outputs[0].labels


def _link_chain(target: Path, length: int, prefix: str) -> Path:
    """``length`` symlinks beside ``target``, each to the one before; the last."""
    previous = target
    for i in range(length):
        link = target.parent / f"{prefix}{i}"
        link.symlink_to(previous)
        previous = link
    return previous


async def _two_polls(reloader: Reloader) -> None:
    """A change is seen at one poll and acted on at the next."""
    await reloader.watcher.poll()
    await reloader.watcher.poll()


def _watching(tmp_path: Path, labels: str = "a.txt") -> tuple[Path, _Applied, Reloader]:
    """guard.yaml naming ``labels`` (which holds a, b), loaded, and its reloader."""
    config = tmp_path / "guard.yaml"
    config.write_text(_rules(labels))
    (tmp_path / labels).write_text("a\nb\n")
    applied = _Applied(load_config(config))
    return config, applied, applied.reloader(config)


async def test_the_watcher_follows_the_labels_files_of_the_rules_in_effect(tmp_path: Path) -> None:
    """Found: a labels file replaced alone (its config unchanged) was never
    reloaded; the old labels were served until an unrelated reload."""
    config, applied, reloader = _watching(tmp_path)
    (tmp_path / "b.txt").write_text("x\ny\n")
    write_atomic(tmp_path / "a.txt", "a2\nb2\n")
    await reloader.watcher.poll()
    assert _labels(applied) == ("a", "b")  # the watcher waits one poll
    await reloader.watcher.poll()
    assert _labels(applied) == ("a2", "b2") and applied.counted == ["success"]
    write_atomic(config, _rules("b.txt"))  # a new set: b.txt, not a.txt
    await _two_polls(reloader)
    assert _labels(applied) == ("x", "y") and applied.counted == ["success"] * 2
    write_atomic(tmp_path / "a.txt", "a3\nb3\n")
    await _two_polls(reloader)
    await _two_polls(reloader)
    assert applied.counted == ["success"] * 2  # neither a.txt nor the set's change repeats
    write_atomic(tmp_path / "b.txt", "x2\ny2\n")
    await _two_polls(reloader)
    assert _labels(applied) == ("x2", "y2") and applied.counted == ["success"] * 3


def _break(path: Path, how: str) -> str:
    """Replace ``path`` with a broken labels file; what the failure says."""
    tmp = path.with_name("broken")
    if how == "fifo":
        os.mkfifo(tmp)
    elif how == "too large":
        tmp.write_bytes(b"a\n" * (rules_config.LABELS_FILE_MAX_BYTES // 2 + 1))
    else:
        tmp.write_text("a\n\nb\n")
    os.replace(tmp, path)
    return {"fifo": "is a FIFO", "too large": "larger than the", "bad line": "line 2 is empty"}[how]


@pytest.mark.parametrize("how", ["bad line", "too large", "fifo"])
async def test_a_broken_labels_file_keeps_the_old_rules_and_is_still_watched(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    _config, applied, reloader = _watching(tmp_path)
    says = _break(tmp_path / "a.txt", how)
    await asyncio.wait_for(_two_polls(reloader), CHECK_SECONDS)
    assert _labels(applied) == ("a", "b") and applied.counted == ["failure"]
    assert says in caplog.text
    await _two_polls(reloader)
    assert applied.counted == ["failure"]  # counted once
    write_atomic(tmp_path / "a.txt", "c\nd\n")  # repaired: the same file, still watched
    await _two_polls(reloader)
    assert _labels(applied) == ("c", "d") and applied.counted == ["failure", "success"]


async def test_a_removed_labels_file_is_waited_for_and_a_signal_reload_fails(
    tmp_path: Path,
) -> None:
    _config, applied, reloader = _watching(tmp_path)
    (tmp_path / "a.txt").unlink()
    await _two_polls(reloader)  # missing: mid-rotation, as a config file would be
    assert applied.counted == []
    assert await reloader.reload() is False  # SIGHUP reads it, and fails
    assert _labels(applied) == ("a", "b") and applied.counted == ["failure"]
    (tmp_path / "a.txt").write_text("c\nd\n")
    await _two_polls(reloader)
    assert _labels(applied) == ("c", "d") and applied.counted == ["failure", "success"]


async def test_a_config_renaming_a_missing_labels_file_is_reloaded(tmp_path: Path) -> None:
    """Found (red team): a missing labels file made the whole set's identity
    'missing', so the watcher ignored every change, the config's included:
    `mv labels.txt labels-v2.txt`, then a config naming labels-v2.txt, was
    never reloaded, and nothing was logged."""
    config, applied, reloader = _watching(tmp_path, "labels.txt")
    (tmp_path / "labels.txt").rename(tmp_path / "labels-v2.txt")
    await _two_polls(reloader)
    assert applied.counted == []  # the missing file alone is waited for
    write_atomic(config, _rules("labels-v2.txt"))
    await _two_polls(reloader)
    assert applied.counted == ["success"] and _labels(applied) == ("a", "b")


async def test_a_symlink_chain_past_the_kernels_limit_leaves_the_watcher_working(
    tmp_path: Path,
) -> None:
    """Found (red team): os.path.realpath followed a chain of 1,200 links by
    recursion; its RecursionError killed the polling task, silently, and no
    change was reloaded until a restart. Each file is now one stat: the kernel
    stops at its link limit (ELOOP) and the file counts as missing."""
    _config, applied, reloader = _watching(tmp_path, "labels.txt")
    labels = tmp_path / "labels.txt"
    target = tmp_path / "real.txt"
    target.write_text("c\nd\n")
    labels.unlink()
    labels.symlink_to(_link_chain(target, 1200, "link"))
    await _two_polls(reloader)  # no exception: the chain counts as missing
    assert applied.counted == []
    write_atomic(labels, "e\nf\n")  # the chain gone, a good file back
    await _two_polls(reloader)
    assert applied.counted == ["success"] and _labels(applied) == ("e", "f")


async def test_a_poll_is_one_stat_per_file_however_deep_the_links(tmp_path: Path) -> None:
    """Found (red team): 100 labels files behind 38 links each in deep
    directories took 5.4 s a poll, on the event loop, every second
    (realpath's lstat per component per link). One stat each is bounded by
    the kernel's own walk."""
    deep = tmp_path.joinpath(*(f"d{i}" for i in range(100)))
    deep.mkdir(parents=True)
    files = []
    for n in range(100):
        target = deep / f"t{n}.txt"
        target.write_text("a\n")
        files.append(_link_chain(target, 38, f"l{n}_"))
    watcher = FileWatcher(files, _Calls())
    start = time.perf_counter()
    for _ in range(5):
        await watcher.poll()
    per_poll = (time.perf_counter() - start) / 5
    assert per_poll < 0.25, f"{per_poll * 1000:.0f} ms a poll"  # 5.4 s a poll before


async def test_fixing_a_labels_file_that_only_the_failed_config_names_reloads(
    tmp_path: Path,
) -> None:
    """Found: a config naming a new labels file with a bad line failed to
    reload, as it should; fixing that labels file then did nothing (only the
    old rules' files were watched) until a SIGHUP or an edit of the config."""
    config, applied, reloader = _watching(tmp_path)
    (tmp_path / "b.txt").write_text("x\n\x01y\n")  # a control character: refused
    write_atomic(config, _rules("b.txt"))
    await _two_polls(reloader)
    assert applied.counted == ["failure"] and _labels(applied) == ("a", "b")
    write_atomic(tmp_path / "b.txt", "x\ny\n")
    await _two_polls(reloader)
    assert applied.counted == ["failure", "success"] and _labels(applied) == ("x", "y")
