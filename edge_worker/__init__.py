"""The edge side: a grpc.aio server running the small model and its decoder."""
