"""Codecs: the wire views, varints, tensors, the response and request readers.

They know nothing of rules or transports.
"""
