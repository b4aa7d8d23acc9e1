"""The REST fuzz target (tests/fuzz/fuzz_rest.py) over hypothesis-generated
inputs: mutated TF Serving bodies and arbitrary JSON-ish text."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.fuzz_rest import one_input, seeds

_SEEDS = seeds()


def test_the_rest_fuzz_target_survives_its_seeds() -> None:
    for seed in _SEEDS:
        one_input(seed)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_SEEDS),
    st.lists(st.tuples(st.integers(0, 4000), st.binary(max_size=6)), max_size=4),
    st.integers(0, 255),
)
def test_the_rest_fuzz_target_survives_mutated_bodies(
    seed: bytes, edits: list[tuple[int, bytes]], selector: int
) -> None:
    body = bytearray(seed[1:])
    for at, data in edits:
        at = min(at, len(body))
        body[at : at + len(data)] = data
    one_input(bytes([selector]) + bytes(body))


_TOKENS = st.sampled_from(
    [b"{", b"}", b"[", b"]", b",", b":", b'"predictions"', b'"outputs"', b'"out1"', b"1.5",
     b"NaN", b"-Infinity", b'"b64"', b'"x"', b"true", b"null", b" ", b"\n", b'"\\u0041"',
     b'"signature_name"', b'"instances"', b"1e400", b"-0", b"2"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.lists(_TOKENS, max_size=40))
def test_the_rest_fuzz_target_survives_json_like_text(selector: int, tokens: list[bytes]) -> None:
    one_input(bytes([selector]) + b"".join(tokens))
