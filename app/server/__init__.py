"""The HTTP server around the ASGI app: uvicorn, configured from the settings, with the connection
limits a slow or hostile client needs (`connections`), the descriptor limit they are sized from
(`descriptors`), and the proxies whose forwarded headers are believed (`config`).

Only `app.cli` (the `serve` command) imports this package; the app itself does not know which
server runs it.
"""
