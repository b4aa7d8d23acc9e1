"""Development tooling: the local TF-Serving-compatible backend, the seed
models and the demo. These import TensorFlow, always in their own process."""
