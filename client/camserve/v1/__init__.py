"""Generated gRPC messages and stubs for camserve.v1 (``make proto`` writes them; do not edit)."""
