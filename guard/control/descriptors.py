"""The process's file-descriptor limit, raised to what ``max_connections`` needs.

Each client connection holds a descriptor. Under systemd, and in containers
of containerd 2 and later, a process starts with a soft limit of 1,024 and a
far higher hard one. Past the soft limit, accepting fails on every listener
(asyncio logs a traceback each time), gRPC cannot open a socket to the
upstream, and the metrics port stops answering, so probes fail: 600 idle TCP
connections to the REST port of a guard with a limit of 512 did all of that.
As Go's runtime does for every program, the soft limit is raised to the hard
one at start; where the hard limit is under what the listeners may hold, the
guard says so and names the setting to lower.
"""

from __future__ import annotations

import logging
import resource

from guard.control.config import Config

__all__ = ["descriptors_needed", "limit_warning", "raise_descriptor_limit"]

logger = logging.getLogger("guard")

_RESERVE = 256
"""Descriptors beside client connections: the upstream's, the metrics
port's and its scrapes', config and TLS files, the event loop's, gRPC's."""


def descriptors_needed(config: Config) -> int:
    """What one guard process may hold at once with ``config``'s listeners
    full: each listener's ``max_connections``, twice over REST with TLS (a
    connection's socket is duplicated while its first byte is awaited)."""
    per_connection = 1
    if config.rest_upstream:
        per_connection += 2 if config.tls is not None else 1
    return per_connection * config.max_connections + _RESERVE


def raise_descriptor_limit(config: Config) -> int:
    """Raise the soft limit to the hard one (never lower it); warn where it
    stays under :func:`descriptors_needed`. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = descriptors_needed(config)
    target = max(soft, needed) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # a kernel cap under the hard limit (nr_open)
            logger.info("could not raise the file-descriptor limit to %d: %s", target, exc)
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning("%s", limit_warning(config, int(soft)))
    return int(soft)


def limit_warning(config: Config, limit: int) -> str:
    """What to say of a descriptor ``limit`` under :func:`descriptors_needed`."""
    needed = descriptors_needed(config)
    per_connection = (needed - _RESERVE) // config.max_connections
    fitting = (limit - _RESERVE) // per_connection
    raise_it = "raise the limit (ulimit -n, LimitNOFILE, the container runtime's nofile)"
    if fitting >= 1:
        advice = f"{raise_it} or lower max_connections to {fitting}"
    else:  # the guard's own descriptors take it all
        advice = f"{raise_it} to at least {needed}: no max_connections fits under {limit}"
    return (
        f"this process may open {needed} file descriptors ({config.max_connections} "
        f"connections per listener, max_connections), but its limit is {limit}: past it, "
        "connections are refused on every port, metrics included, and the upstream cannot "
        f"be reached; {advice}"
    )
