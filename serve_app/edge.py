"""Kept so that `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.edge:proxy_middlewares`, set on the
nodes of clusters deployed before the HTTP side moved to `serve_app.http`, keeps working."""

from serve_app.http.edge import proxy_middlewares

__all__ = ["proxy_middlewares"]
