"""The audit log: one JSON line (logger `optiforge.audit`) per change a person may need to trace —
create, delete, alias, batching, cancel, key and project changes — naming the key that made it
(its id, never the key), its project, the action and what it acted on.

Lines go wherever the process logs (stderr as JSON by default, `OPTIFORGE_LOG_FORMAT`); a log
collector that keeps `logger == "optiforge.audit"` has the trail.
"""

from __future__ import annotations

import logging
from typing import Any

from app.core.keys import Principal

audit_log = logging.getLogger("optiforge.audit")


def audit(principal: Principal | None, action: str, target: str, **details: Any) -> None:
    """Record that `principal` did `action` (e.g. `model.delete`) to `target` (an id).

    `principal` None is the server-side CLI, acting for whoever runs it on the server.
    """
    actor = "cli" if principal is None else (principal.key_id or "open")
    project_id = principal.project_id if principal else details.pop("project_id", None)
    audit_log.info(
        "%s %s by %s",
        action,
        target,
        actor,
        # The change's own fields go under `details`: a field named like a LogRecord attribute
        # (`name`, `msg`) would make logging refuse the whole line.
        extra={
            "audit": True,
            "action": action,
            "target": target,
            "key_id": actor,
            "project_id": project_id,
            "details": details,
        },
    )
