"""gRPC transport: workers, the peer data plane and the coordinator's client. The only package
that imports grpc."""
