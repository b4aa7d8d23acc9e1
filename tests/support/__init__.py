"""Shared test support: official-proto builders, the fake upstream, the guard
run in-process or as a process. Only :mod:`tests.support.protos` and
:mod:`tests.support.upstream` import TensorFlow (through its protos)."""
