"""A local web demo: ask a PILL model about an image, or an input of any modality it reads, in the
browser (``pill serve``).

Standard library only: :mod:`http.server` serves one hand-written page whose script streams
answers with ``fetch`` + server-sent events. Use from Python::

    from pill.web import make_server
    server = make_server(vlm, "127.0.0.1", 0)   # port 0: a free port
    print(server.url); server.serve_forever()
"""
from .app import SETTINGS, DemoApp, Limits, RequestError, model_info, validate_settings
from .server import DemoServer, make_server, serve, serve_in_thread

__all__ = ["DemoApp", "DemoServer", "Limits", "RequestError", "SETTINGS", "make_server", "model_info",
           "serve", "serve_in_thread", "validate_settings"]
