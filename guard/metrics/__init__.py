"""Prometheus metrics: the collectors and the guard's metric set, declared
once against an injectable registry."""
