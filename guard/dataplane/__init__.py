"""The data plane: response bytes in, guarded response bytes out.

numpy and protobuf only: nothing here imports grpc or an HTTP library, so
every front-end (gRPC today) shares the same rules, codecs and kernels.
"""
