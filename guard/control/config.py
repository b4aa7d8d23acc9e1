"""Typed configuration: every setting defined once, validated once, at load.

A setting's field in :class:`Config` carries everything about it: its
default, how YAML is read into it, what is allowed, its command-line flag
and environment variable, and whether a reload can apply it. The YAML
parser, the allowed-key list, the CLI flags, the precedence (file < env <
flags, :func:`resolve`) and the restart-only diff are all derived from those
fields. Every error names the file, the rule and the field, and says what is
allowed; unknown keys are errors, with a suggestion when one looks like a typo.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from guard.control.files import FileTooLargeError, check_bounded, read_bounded
from guard.control.memory import young_collections_only
from guard.control.pem import TLS_FILE_MAX_BYTES, PemFiles, pem_problems
from guard.control.rules_config import labels_file_paths, parse_models
from guard.control.validate import (
    Problems,
    as_address,
    as_float,
    as_int,
    as_str,
    check_keys,
    get,
)
from guard.control.yamlfile import YamlBoundError, load_yaml
from guard.dataplane.errors import ConfigError
from guard.dataplane.rulespec import ANY, SERVING_DEFAULT, ModelRule, OutputRule

__all__ = [
    "ANY",
    "SERVING_DEFAULT",
    "Config",
    "ModelRule",
    "OutputRule",
    "Setting",
    "TLSConfig",
    "load_config",
    "overrides_from",
    "parse_config",
    "resolve",
    "restart_only_changes",
    "settings",
]


@dataclass(frozen=True)
class TLSConfig:
    """Certificate files for one side of the guard (all PEM paths)."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    """On the listening side: require client certificates signed by this CA (mTLS).
    Towards the upstream: the CA that signed the upstream's certificate."""
    server_name: str | None = None
    """Upstream side only: override the name checked in the upstream's certificate."""


@dataclass(frozen=True)
class Setting:
    """How one top-level setting is read, overridden and applied."""

    read: Callable[[Problems, str, Mapping[str, Any], Path], Any]
    """Reads the key from the YAML mapping (recording problems) and returns the value."""
    help: str
    flag: str | None = None
    """The ``guard serve`` flag that overrides the file (``--listen``)."""
    env: str | None = None
    """The environment variable that overrides the file (``GUARD_LISTEN``)."""
    reloadable: bool = False
    """Whether a reload applies it (otherwise only a restart does)."""


def _plain(
    key: str, convert: Callable[[Any], Any], allowed: str
) -> Callable[[Problems, str, Mapping[str, Any], Path], Any]:
    default = _DEFAULTS[key]

    def read(problems: Problems, where: str, data: Mapping[str, Any], _: Path) -> Any:
        return get(problems, where, data, key, default, convert, allowed)

    return read


_ADDR = "give HOST:PORT, for example 127.0.0.1:8510"
_DEFAULTS: dict[str, Any] = {}


def _setting(
    default: Any,
    convert: Callable[[Any], Any] | None,
    allowed: str,
    help: str,
    *,
    read: Callable[[Problems, str, Mapping[str, Any], Path], Any] | None = None,
    flag: str | None = None,
    env: str | None = None,
    reloadable: bool = False,
) -> Any:
    """A :class:`Config` field with its :class:`Setting` (the key is filled in below)."""
    meta: dict[str, Any] = {"convert": convert, "allowed": allowed, "read": read, "help": help}
    meta |= {"flag": flag, "env": env, "reloadable": reloadable}
    return field(default=default, metadata={"setting": meta})


def _read_upstream(problems: Problems, where: str, data: Mapping[str, Any], _: Path) -> Any:
    if "upstream" in data and data["upstream"] is None:
        return None  # dev mode: the local backend's address is filled in at start
    return get(problems, where, data, "upstream", _DEFAULTS["upstream"], as_address, _ADDR)


_LOG_LEVELS = ("debug", "info", "warning", "error")


def _as_log_level(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in _LOG_LEVELS:
        raise ValueError("")
    return value.lower()


def _tls_reader(upstream: bool) -> Callable[[Problems, str, Mapping[str, Any], Path], Any]:
    key = "upstream_tls" if upstream else "tls"

    def read(problems: Problems, _: str, data: Mapping[str, Any], base_dir: Path) -> Any:
        return _parse_tls(problems, key, data.get(key), base_dir, upstream)

    return read


def _read_models(problems: Problems, _: str, data: Mapping[str, Any], base_dir: Path) -> Any:
    return parse_models(problems, data.get("models", []), base_dir, problems.source)


@dataclass(frozen=True)
class Config:
    """The whole guard configuration."""

    listen: str = _setting(
        "0.0.0.0:8500", as_address, _ADDR,
        "Where clients connect, with TF Serving's gRPC API.",
        flag="--listen", env="GUARD_LISTEN",
    )  # fmt: skip
    upstream: str | None = _setting(
        "127.0.0.1:8510", None, _ADDR,
        "TF Serving's gRPC address. None only in dev mode (guard serve --model).",
        read=_read_upstream, flag="--upstream", env="GUARD_UPSTREAM",
    )  # fmt: skip
    rest_listen: str = _setting(
        "0.0.0.0:8501", as_address, _ADDR,
        "Where REST clients connect, with TF Serving's REST API (served when rest_upstream "
        "is set).",
        flag="--rest-listen", env="GUARD_REST_LISTEN",
    )  # fmt: skip
    rest_upstream: str | None = _setting(
        None, as_address, _ADDR,
        "TF Serving's REST address (its --rest_api_port); REST is served when it is set.",
        flag="--rest-upstream", env="GUARD_REST_UPSTREAM",
    )  # fmt: skip
    metrics_listen: str = _setting(
        "0.0.0.0:9102", as_address, _ADDR,
        "Prometheus /metrics over HTTP. Use 127.0.0.1:PORT to keep it on the pod.",
        flag="--metrics-listen", env="GUARD_METRICS_LISTEN",
    )  # fmt: skip
    default_timeout_s: float = _setting(
        30.0, as_float(0.0, 86400.0, lo_open=True), "give seconds, > 0",
        "Deadline for unary upstream calls and REST when the client sets none (a relayed "
        "stream has none: stream_idle_timeout_s ends one on which nothing moves).",
    )  # fmt: skip
    max_message_mb: int = _setting(
        64, as_int(1, 2047), "give whole MiB between 1 and 2047",
        "Largest response message (upstream to client, derived outputs included), in MiB.",
    )  # fmt: skip
    max_request_mb: int = _setting(
        32, as_int(1, 2047), "give whole MiB between 1 and 2047",
        "Largest request message after decompression, in MiB; gRPC stops decompressing there.",
    )  # fmt: skip
    max_inflight_mb: int = _setting(
        128, as_int(1, 65536), "give whole MiB >= 1",
        "Bytes that requests and responses in flight, and answers their clients have not taken "
        "yet, may hold together; calls (and upstream answers) beyond it get RESOURCE_EXHAUSTED.",
    )  # fmt: skip
    max_memory_mb: int = _setting(
        0, as_int(0, 1_048_576), "give whole MiB >= 0 (0: no ceiling)",
        "RSS of a guard process past which it closes every gRPC client connection, to free "
        "what they hold before the container's memory limit kills it; 0 turns it off. Set it a "
        "little under that limit (with --workers N, under the limit's N-th part).",
    )  # fmt: skip
    max_concurrent_rpcs: int = _setting(
        1024, as_int(1, 1_000_000), "give a whole number >= 1",
        "Calls forwarded to the upstream at once; calls beyond it get RESOURCE_EXHAUSTED at once.",
    )  # fmt: skip
    max_relayed_streams: int = _setting(
        256, as_int(1, 1_000_000), "give a whole number >= 1",
        "Of max_concurrent_rpcs, how many streaming calls may hold at once (a stream rightly "
        "holds its slot while it sends nothing); beyond it, RESOURCE_EXHAUSTED. At most three "
        "quarters of max_concurrent_rpcs (from 4 on), whatever it says here.",
    )  # fmt: skip
    max_pending_requests: int = _setting(
        4096, as_int(1, 1_000_000), "give a whole number >= 1",
        "Calls whose request message has not fully arrived yet; beyond it, RESOURCE_EXHAUSTED.",
    )  # fmt: skip
    request_timeout_s: float = _setting(
        10.0, as_float(0.0, 3600.0, lo_open=True), "give seconds, > 0",
        "How long a unary request message may take to arrive after its headers.",
    )  # fmt: skip
    stream_idle_timeout_s: float = _setting(
        300.0, as_float(0.0, 86400.0, lo_open=True), "give seconds, > 0",
        "A proxied stream with no message either way for this long is ended; a gRPC answer (or "
        "relayed message) not taken within it, or a REST answer of which the client takes "
        "nothing for this long, has its connection cut.",
    )  # fmt: skip
    max_streams_per_connection: int = _setting(
        100, as_int(1, 1_000_000), "give a whole number >= 1",
        "HTTP/2 streams one client connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS).",
    )  # fmt: skip
    stream_window_kb: int = _setting(
        1024, as_int(0, 1_048_576), "give whole KiB >= 0 (0: gRPC sizes it)",
        "HTTP/2 window of each stream the guard receives on (client calls, and streams relayed "
        "from the upstream): what a peer may send ahead of what the guard has read. 0 lets gRPC "
        "size it from its bandwidth estimate, faster for large requests from far away, but tens "
        "of MB per stream that a client can fill.",
    )  # fmt: skip
    max_connections: int = _setting(
        2048, as_int(1, 1_000_000), "give a whole number >= 1",
        "Client connections each listener (gRPC, REST) of a guard process holds at once; a new "
        "one beyond it is closed at once (over REST, after a 503 saying why).",
    )  # fmt: skip
    max_metadata_kb: int = _setting(
        16, as_int(1, 1024), "give whole KiB between 1 and 1024",
        "Largest request metadata (headers), in KiB; larger gets RESOURCE_EXHAUSTED.",
    )  # fmt: skip
    max_metadata_entries: int = _setting(
        100, as_int(1, 10_000), "give a whole number between 1 and 10000",
        "Most request metadata entries (headers); more gets RESOURCE_EXHAUSTED.",
    )  # fmt: skip
    max_connection_idle_s: float = _setting(
        600.0, as_float(0.0, 86400.0, lo_open=True), "give seconds, > 0",
        "A client connection with no call for this long gets GOAWAY.",
    )  # fmt: skip
    max_connection_age_s: float = _setting(
        3600.0, as_float(0.0, 604800.0, lo_open=True), "give seconds, > 0",
        "A client connection this old gets GOAWAY (clients reconnect, and rebalance).",
    )  # fmt: skip
    max_connection_age_grace_s: float = _setting(
        60.0, as_float(0.0, 86400.0), "give seconds, >= 0",
        "After a connection's GOAWAY for age, its calls get this long before it is closed.",
    )  # fmt: skip
    shutdown_grace_s: float = _setting(
        10.0, as_float(0.0, 3600.0), "give seconds, >= 0",
        "On SIGTERM, in-flight calls get this long to finish.",
    )  # fmt: skip
    worker_stall_timeout_s: float = _setting(
        10.0, as_float(1.0, 3600.0), "give seconds, >= 1",
        "Under --workers: a worker whose event loop has not run for this long (stopped, "
        "stuck) is killed and replaced.",
    )  # fmt: skip
    health_check_interval_s: float = _setting(
        1.0, as_float(0.05, 3600.0), "give seconds, >= 0.05",
        "How often the upstream is probed (health service and guard_upstream_up).",
    )  # fmt: skip
    max_class_label_values: int = _setting(
        100, as_int(1, 10_000), "give a whole number between 1 and 10000",
        "Distinct class label values per output before __other__.",
    )  # fmt: skip
    log_level: str = _setting(
        "info", _as_log_level, "use debug, info, warning or error", "How much the guard logs.",
        flag="--log-level",
    )  # fmt: skip
    tls: TLSConfig | None = _setting(
        None, None, "", "TLS on the listening side.", read=_tls_reader(upstream=False)
    )
    upstream_tls: TLSConfig | None = _setting(
        None, None, "", "TLS towards the upstream.", read=_tls_reader(upstream=True)
    )
    models: tuple[ModelRule, ...] = _setting(
        (), None, "", "The rules, per model, signature and output.",
        read=_read_models, reloadable=True,
    )  # fmt: skip
    source: str = field(default="<defaults>", compare=False)
    """The file this came from."""
    labels_files: tuple[Path, ...] = field(default=(), compare=False)
    """The labels files the rules name, as written (watched for changes)."""

    @property
    def max_message_bytes(self) -> int:
        """``max_message_mb`` in bytes, capped to what gRPC accepts."""
        return min(self.max_message_mb * 1024 * 1024, 2**31 - 1)

    @property
    def max_request_bytes(self) -> int:
        """``max_request_mb`` in bytes, capped to what gRPC accepts."""
        return min(self.max_request_mb * 1024 * 1024, 2**31 - 1)

    @property
    def stream_window_bytes(self) -> int:
        """``stream_window_kb`` in bytes (0: gRPC sizes the windows)."""
        return self.stream_window_kb * 1024

    @property
    def max_inflight_bytes(self) -> int:
        """``max_inflight_mb`` in bytes."""
        return self.max_inflight_mb * 1024 * 1024

    def model_names(self) -> frozenset[str]:
        """Configured exact model names (the only ones used as metric labels)."""
        return frozenset(m.name for m in self.models if m.name != ANY)


def _setting_of(f: Field[Any]) -> Setting:
    meta = f.metadata["setting"]
    read = meta["read"] or _plain(f.name, meta["convert"], meta["allowed"])
    return Setting(read, meta["help"], meta["flag"], meta["env"], meta["reloadable"])


def settings() -> Iterator[tuple[str, Setting]]:
    """Every top-level setting, by name, in declaration order."""
    for f in fields(Config):
        if "setting" in f.metadata:
            yield f.name, _SETTINGS[f.name]


_DEFAULTS.update({f.name: f.default for f in fields(Config)})
_SETTINGS: dict[str, Setting] = {
    f.name: _setting_of(f) for f in fields(Config) if "setting" in f.metadata
}


# ------------------------------------------------------------------------- TLS


_TLS_FILES = ("cert_file", "key_file", "ca_file")


def _tls_path(
    problems: Problems, where: str, value: Mapping[str, Any], key: str, base_dir: Path
) -> tuple[str | None, str | None]:
    """The path given for ``key``, twice: the second is ``None`` unless it is
    a regular file within the size limit (only such a file is then read)."""
    raw = get(problems, where, value, key, None, as_str, "give a file path")
    if raw is None:
        return None, None
    if not raw.strip():  # else the config's own directory, "not a regular file"
        problems.add(where, f"field '{key}': the path is empty; give a file path")
        return None, None
    path = (base_dir / raw) if not Path(raw).is_absolute() else Path(raw)
    try:
        check_bounded(path, TLS_FILE_MAX_BYTES)
    except FileNotFoundError:
        problems.add(where, f"field '{key}': file '{path}' does not exist")
    except OSError as exc:
        problems.add(where, f"field '{key}': {exc.strerror or exc}; give a PEM file")
    else:
        return str(path), str(path)
    return str(path), None


def _parse_tls(
    problems: Problems, where: str, value: Any, base_dir: Path, upstream: bool
) -> TLSConfig | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.add(where, "must be a mapping with cert_file, key_file, ca_file")
        return None
    allowed = _TLS_FILES + (("server_name",) if upstream else ())
    check_keys(problems, where, value, allowed)
    found = {k: _tls_path(problems, where, value, k, base_dir) for k in _TLS_FILES}
    cert, key, ca = (found[k][0] for k in _TLS_FILES)
    if (cert is None) != (key is None):
        problems.add(where, "cert_file and key_file must be given together")
    if not upstream and cert is None:
        problems.add(where, "the listening side needs cert_file and key_file")
    server_name = get(problems, where, value, "server_name", None, as_str, "give a host name")
    _load_tls(problems, where, {k: usable for k, (_, usable) in found.items() if usable})
    return TLSConfig(cert, key, ca, server_name)


def _load_tls(problems: Problems, where: str, files: Mapping[str, str]) -> None:
    """Read the PEM files and load them as gRPC and ``ssl`` will, so that a
    wrong one is a config error naming it, not a failed bind (or TLS failing
    on every call) later."""
    read: dict[str, bytes] = {}
    for key, path in files.items():
        try:
            read[key] = read_bounded(path, TLS_FILE_MAX_BYTES)
        except OSError as exc:  # replaced or removed since it was checked
            problems.add(where, f"field '{key}': cannot read '{path}': {exc.strerror or exc}")
    pem = PemFiles(read.get("cert_file"), read.get("key_file"), read.get("ca_file"))
    paths = (files.get("cert_file"), files.get("key_file"), files.get("ca_file"))
    for problem in pem_problems(pem, *paths):
        problems.add(where, str(problem))


# ------------------------------------------------------------------------ YAML


def parse_config(
    data: Any,
    source: str = "<config>",
    base_dir: Path | None = None,
    explicit_models: bool = False,
) -> Config:
    """Validate an already-loaded YAML document. Raises :class:`ConfigError`.

    With ``explicit_models`` (a config file), a missing ``models`` field is an
    error: running without rules must be asked for, with ``models: []``.
    """
    problems = Problems(source)
    base_dir = base_dir or Path.cwd()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping (listen, upstream, models, ...)"
        )
    check_keys(problems, "", data, _SETTINGS)
    if explicit_models and "models" not in data:
        problems.add(
            "", "field 'models' is missing; give the model rules, or write 'models: []' to run "
            "the guard as a pure proxy",
        )  # fmt: skip
    values = {name: s.read(problems, "", data, base_dir) for name, s in _SETTINGS.items()}
    labels_files = labels_file_paths(data.get("models"), base_dir)
    try:
        problems.raise_if_any()
    except ConfigError as exc:
        exc.labels_files = labels_files
        raise
    return Config(**values, source=source, labels_files=labels_files)


_CONFIG_MAX_BYTES = 16 * 1024 * 1024


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file. Raises :class:`ConfigError`."""
    path = Path(path)
    try:
        text = read_bounded(path, _CONFIG_MAX_BYTES).decode("utf-8")
    except FileTooLargeError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: cannot read the config file: not UTF-8 (byte {exc.start})"
        ) from None
    with young_collections_only():
        return _parse_file(path, text)


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """Where in ``text`` and what: ' at line L, column C: problem'."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML refuses: no mark
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        # The lines after the first name PyYAML's own input, "<unicode string>".
        return f" at line {line}, column {column}: {str(exc).splitlines()[0]}"
    mark = getattr(exc, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{at}: {getattr(exc, 'problem', None) or exc}"


def _parse_file(path: Path, text: str) -> Config:
    try:
        data = load_yaml(text)
    except YamlBoundError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML{_yaml_problem(exc, text)}") from None
    if data is None:
        raise ConfigError(
            f"{path}: the config file is empty; give the model rules, or write 'models: []' "
            "to run the guard as a pure proxy"
        )
    return parse_config(data, source=str(path), base_dir=path.parent, explicit_models=True)


# ------------------------------------------------------------------ precedence


def overrides_from(env: Mapping[str, str], flags: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that environment variables and flags override (flags win),
    validated as the file is. ``flags`` maps setting names to flag values
    (``None``: not given). Raises :class:`ConfigError`."""
    problems = Problems("command line and environment")
    found: dict[str, Any] = {}
    for name, s in _SETTINGS.items():
        value = flags.get(name)
        origin = s.flag
        if value is None and s.env is not None and env.get(s.env):
            value, origin = env[s.env], s.env
        if value is None:
            continue
        found[name] = s.read(problems, str(origin), {name: value}, Path.cwd())
    problems.raise_if_any()
    return found


def resolve(path: str | Path | None, overrides: Mapping[str, Any]) -> Config:
    """The config file (or the defaults), with ``overrides`` applied on top:
    the one place the precedence file < environment < flags is applied, at
    start and on every reload."""
    config = load_config(path) if path else Config()
    return replace(config, **overrides) if overrides else config


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The settings that differ and that a reload cannot apply."""
    return [
        name
        for name, s in _SETTINGS.items()
        if not s.reloadable and getattr(old, name) != getattr(new, name)
    ]
