"""``guard demo``: the seed models behind the local backend and the guard.

Importing this package does not import TensorFlow; :func:`guard.dev.demo.run.run_demo` does.
"""
