"""The gRPC surface: servicers (thin handlers), streams, validation of requests and building of
answers, authentication. Torch-free: it works on ``domain`` values and hands them to the
batcher."""
