"""Between the handlers and the engine: the bounded queue, admission and the worker that runs
batches. Torch-free."""
