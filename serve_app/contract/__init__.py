"""The contract every part of the service shares: the wire models and the error catalog.

Pydantic only: no Starlette, FastAPI, Ray or torch, so the model side, the queue and the HTTP
side all import it and a client could too.
"""
