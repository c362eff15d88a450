"""The transport edge: grpc.aio servicers, HTTP health/metrics, composition root."""
