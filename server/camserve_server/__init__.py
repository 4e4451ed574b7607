"""camserve server: an image classifier over gRPC, with Grad-CAM explanations.

A request travels handler (``handler.py``: validate with ``request.py``, decode with
``images.py``) → batcher (``batcher.py``) → engine (``engine.py``, methods in ``cams.py``) →
response (``response.py``). ``server.py`` assembles them; ``settings.py`` holds the one settings
object; ``models.py`` loads the model.
"""

__version__ = "0.1.0"
