"""The gRPC front-end: the proxy handler, the upstream channel and health."""
