"""HTTP beside gRPC: an ASGI app (Starlette on uvicorn) on the gRPC server's event loop, a thin
adapter over the same handlers (app.py assembles it; gateway.py and context.py carry a call
through the handlers that ``api/calls.py`` wraps; camserve_json.py, oip_rest.py and
websocket.py are the protocols; static/ is the explorer page)."""
