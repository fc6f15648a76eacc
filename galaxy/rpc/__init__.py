"""gRPC transport: workers, the peer data plane and the coordinator's client. The only package
that imports grpc (galaxy/__init__.py quiets gRPC's own logging before it is imported)."""
