"""What one client may hold of the guard, checked as a call arrives and counted
while it runs: its metadata, the calls still receiving their request, the
calls in flight to the upstream, and the bytes they hold, answers their
clients have not taken yet included (:class:`Held`).

Every refusal names the limit and the config key that sets it, and is counted
by reason (``guard_refused_requests_total``).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any

from guard.control.config import Config

__all__ = ["Gate", "Held", "Refusal"]


class Refusal(Enum):
    """Why a call was refused (the ``reason`` label of ``guard_refused_requests_total``)."""

    METADATA = "metadata"
    PENDING = "pending_requests"
    REQUEST_TIMEOUT = "request_timeout"
    REQUEST_TOO_LARGE = "request_too_large"
    INFLIGHT_CALLS = "inflight_calls"
    RELAYED_STREAMS = "relayed_streams"
    INFLIGHT_BYTES = "inflight_bytes"
    RESPONSE_TOO_LARGE = "response_too_large"
    STREAM_IDLE = "stream_idle"
    CONNECTIONS = "connections"


def relayed_cap(config: Config) -> int:
    """How many streaming calls may be relayed at once: ``max_relayed_streams``,
    but never more than three quarters of ``max_concurrent_rpcs`` (from 4 on),
    so that lowering that alone keeps the unary calls a share."""
    rpcs = config.max_concurrent_rpcs
    return max(1, min(config.max_relayed_streams, rpcs - rpcs // 4))


class Gate:
    """The server's limits for calls, counted in one place."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pending = 0
        """Calls whose request has not fully arrived."""
        self.inflight = 0
        """Calls forwarded to the upstream and not answered yet."""
        self.inflight_bytes = 0
        """Bytes of requests and responses that calls in flight hold, and of
        answers handed to the transport that their clients have not taken yet."""
        self.relayed = 0
        """Streaming calls in flight (counted in :attr:`inflight` too)."""
        self.max_relayed = relayed_cap(config)
        self._max_metadata = config.max_metadata_kb * 1024

    def metadata_problem(self, metadata: Sequence[tuple[str | bytes, Any]] | None) -> str | None:
        """Why ``metadata`` (gRPC's pairs, or HTTP's raw header lines) is too large
        to take, or ``None``."""
        if not metadata:
            return None
        if len(metadata) > self.config.max_metadata_entries:
            return (
                f"guard: the request carries {len(metadata)} metadata entries, more than "
                f"max_metadata_entries ({self.config.max_metadata_entries}); send fewer headers, "
                "or raise max_metadata_entries in the guard config"
            )
        size = sum(len(k) + len(v) for k, v in metadata)
        if size > self._max_metadata:
            return (
                f"guard: the request's metadata takes {size} bytes, more than max_metadata_kb "
                f"({self.config.max_metadata_kb} KiB); send smaller headers, or raise "
                "max_metadata_kb in the guard config"
            )
        return None

    def pending_problem(self) -> str | None:
        """Why another call may not start receiving its request, or ``None``."""
        if self.pending < self.config.max_pending_requests:
            return None
        return (
            f"guard: {self.pending} calls are still receiving their request, the "
            "max_pending_requests limit; retry with backoff, or raise max_pending_requests"
        )

    def admit(self, size: int) -> tuple[Refusal, str] | None:
        """Take an in-flight slot and ``size`` bytes of the budget for a call, or
        say why not (and take nothing); :meth:`release` gives it back."""
        refused = self._inflight_problem(size)
        if refused is None:
            self.inflight += 1
            self.inflight_bytes += size
        return refused

    def answer_problem(
        self, size: int, own: int, what: str = "the upstream's answer"
    ) -> tuple[Refusal, str] | None:
        """Why an upstream answer of ``size`` bytes may not be taken on by a
        call that holds ``own`` bytes of the budget, or ``None``: refused
        where what the other calls hold, answers their clients have not taken
        included, and this answer would pass ``max_inflight_mb``. An answer
        is known only once it came, so calls admitted together may bring
        more than the budget holds; a call alone is never refused (a single
        answer up to ``max_message_mb`` passes). ``what`` names it in the
        refusal."""
        others = self.inflight_bytes - own
        if others <= 0 or others + size <= self.config.max_inflight_bytes:
            return None
        return Refusal.INFLIGHT_BYTES, (
            f"guard: calls in flight and answers not yet taken by their clients hold "
            f"{others} bytes, and {what} of {size} bytes would pass "
            f"max_inflight_mb ({self.config.max_inflight_mb} MiB); retry with backoff, or raise "
            "max_inflight_mb in the guard config"
        )

    def arriving_problem(self, received: int) -> tuple[Refusal, str] | None:
        """Why a request body still arriving, whose ``received`` bytes are
        counted already, may not go on, or ``None``: the budget is past, and
        other calls hold some of it (a call alone is never refused)."""
        others = self.inflight_bytes - received
        if others <= 0 or self.inflight_bytes <= self.config.max_inflight_bytes:
            return None
        return Refusal.INFLIGHT_BYTES, (
            f"guard: calls in flight and answers not yet taken by their clients hold {others} "
            f"bytes, and this request's {received} bytes so far pass max_inflight_mb "
            f"({self.config.max_inflight_mb} MiB); retry with backoff, or raise max_inflight_mb "
            "in the guard config"
        )

    def admit_stream(self) -> tuple[Refusal, str] | None:
        """:meth:`admit` a streaming call, within ``max_relayed_streams`` too:
        a stream may hold its slot for as long as it sends nothing (a
        bidirectional client may wait on the upstream), and streams that
        did so took every slot from the unary calls.
        :meth:`release_stream` gives it back."""
        if self.relayed >= self.max_relayed:
            return (
                Refusal.RELAYED_STREAMS,
                f"guard: {self.relayed} streaming calls already relayed, the max_relayed_streams "
                "limit; retry with backoff, or raise max_relayed_streams in the guard config",
            )
        refused = self.admit(0)
        if refused is None:
            self.relayed += 1
        return refused

    def release_stream(self) -> None:
        """Give back what :meth:`admit_stream` took."""
        self.relayed -= 1
        self.release(0)

    def release(self, size: int) -> None:
        """Give back what :meth:`admit` took for a call of ``size`` bytes."""
        self.inflight -= 1
        self.inflight_bytes -= size

    def _inflight_problem(self, size: int) -> tuple[Refusal, str] | None:
        """Why a call holding ``size`` bytes may not go to the upstream now, or ``None``."""
        if self.inflight >= self.config.max_concurrent_rpcs:
            return Refusal.INFLIGHT_CALLS, (
                f"guard: {self.inflight} calls already in flight, the max_concurrent_rpcs "
                "limit; retry with backoff, or raise max_concurrent_rpcs in the guard config"
            )
        if self.inflight_bytes + size > self.config.max_inflight_bytes:
            return Refusal.INFLIGHT_BYTES, (
                f"guard: calls in flight and answers not yet taken by their clients hold "
                f"{self.inflight_bytes} bytes, and this request's "
                f"{size} more would pass max_inflight_mb ({self.config.max_inflight_mb} MiB); "
                "retry with backoff, or raise max_inflight_mb in the guard config"
            )
        return None


class Held:
    """Bytes one call holds outside the gate's admission, counted in its
    budget: an answer from its hand-over to the transport until the client
    has taken it, or the call ends (:meth:`release_all`, as gRPC's done
    callback); a request body as it arrives. A client that opens no
    flow-control window, or reads nothing, would otherwise make the guard
    hold every answer it asked for, uncounted (20 answers of 16 MB held
    700 MB)."""

    __slots__ = ("_gate", "size")

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self.size = 0

    def take(self, size: int) -> None:
        """Count ``size`` more bytes handed over."""
        self.size += size
        self._gate.inflight_bytes += size

    def give_back(self, size: int) -> None:
        """``size`` of the bytes are no longer held (the client took them)."""
        size = min(size, self.size)
        self.size -= size
        self._gate.inflight_bytes -= size

    def release_all(self, *_: object) -> None:
        """The call ended: nothing of it is held any more."""
        self.give_back(self.size)
