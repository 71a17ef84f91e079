"""Stage 1, ingest: validate an uploaded model (`model`), read datasets safely and bind them to
its inputs (`datasets`), and the tensor signatures with each input's batch axis (`signature`).
"""
