"""The HTTP layer: routes (thin), typed dependencies, middleware (body limits, request logs),
error mapping, request and response schemas, and upload handling.
"""
