"""The models a server serves: the repository on disk (``config.py``), one runtime per loaded
version (``runtime.py``: its engines, queue and batcher, its pipeline), and the registry that
loads, unloads and routes calls by name and version while the others serve (``registry.py``).
"""
