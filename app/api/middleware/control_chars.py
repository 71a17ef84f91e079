"""Control characters (NUL above all) never reach the database or the store.

PostgreSQL refuses NUL in text with an error the application would report as a 500, and no id,
name, alias or filter of this API has any use for control characters. So a path or query string
holding one is a 400 here, before routing, and request bodies are checked by the schemas
(`app.api.schemas.InputModel`) and the upload forms.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

from app.api.errors import send_error

#: Every C0 control character and DEL.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
#: What a body or form text may hold: the same, less tab, newline and carriage return.
TEXT_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class ControlCharacterMiddleware:
    """ASGI middleware: 400 `control_characters` for a path or query string that holds one."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            query = unquote_plus(scope.get("query_string", b"").decode("latin-1"))
            if CONTROL_CHARACTERS.search(scope["path"]) or CONTROL_CHARACTERS.search(query):
                where = "path" if CONTROL_CHARACTERS.search(scope["path"]) else "query string"
                detail = (
                    f"the request's {where} holds a control character (such as NUL): ids and names never do"
                )
                await send_error(send, scope["path"], 400, "control_characters", detail)
                return
        await self.app(scope, receive, send)
