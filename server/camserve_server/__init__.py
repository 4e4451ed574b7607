"""camserve server: an image classifier over gRPC, with Grad-CAM explanations.

A request travels ``api`` (handlers, validation) → ``render`` (decode) → ``batching`` (the
queue and its worker) → ``engine`` (the model, CAM methods) → ``api`` (the answer, rendered by
``render``). ``domain.py`` holds the torch-free values they pass along; ``process`` assembles
and runs a server (settings, logging, metrics).
"""

__version__ = "0.1.0"
