"""Projects and API keys in the database: create, list, revoke, and find who a key is.

One place for these rules, used by the admin API (app.api.routes.admin), the server-side CLI
(`optiforge keys …`, `optiforge projects …`) and the request check (app.api.middleware.auth).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from app.core.db import get_sessionmaker
from app.core.errors import ApiError
from app.core.keys import (
    ADMIN,
    MIN_KEY_LENGTH,
    PROJECT_PATTERN,
    Principal,
    check_scopes,
    generate_key,
    granted,
    hash_key,
    shown_part,
)
from app.core.orm import (
    DEFAULT_PROJECT,
    ApiKeyRecord,
    DatasetRecord,
    EngineRecord,
    JobRecord,
    ModelRecord,
    ProjectRecord,
    ServerFlagRecord,
    utcnow,
)
from app.core.outages import usable_during_outage

logger = logging.getLogger(__name__)

#: `last_used_at` is written at most this often per key (a write per request would cost more than it tells).
LAST_USED_RESOLUTION = timedelta(minutes=1)
#: Keys remembered per table (known, unknown); a full table starts again.
MAX_CACHED_KEYS = 10_000
#: The server flag written with the first key: from then on every request needs a key, for good
#: (revoking or deleting every key must not bring keyless "open mode" back).
KEYS_REQUIRED = "keys_required"


def create_project(session: Session, project_id: str) -> ProjectRecord:
    if not PROJECT_PATTERN.match(project_id):
        raise ApiError(
            422,
            "invalid_project_name",
            "a project name is 1-64 characters: lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit",
        )
    if session.get(ProjectRecord, project_id) is not None:
        raise ApiError(409, "project_exists", f"project '{project_id}' exists already")
    project = ProjectRecord(id=project_id)
    session.add(project)
    session.commit()
    return project


def get_project(session: Session, project_id: str) -> ProjectRecord:
    project = session.get(ProjectRecord, project_id)
    if project is None:
        raise ApiError(404, "project_not_found", f"no project '{project_id}'")
    return project


@dataclass(frozen=True)
class ProjectUsage:
    project: ProjectRecord
    models: int
    datasets: int
    engines: int
    active_keys: int


def list_projects(session: Session) -> list[ProjectUsage]:
    """Every project with what it holds (a person deciding what to delete wants the counts)."""

    def counts(kind: type, *where: object) -> dict[str, int]:
        query = select(kind.project_id, func.count()).where(*where).group_by(kind.project_id)
        return dict(session.execute(query).all())

    models, datasets, engines = counts(ModelRecord), counts(DatasetRecord), counts(EngineRecord)
    keys = counts(ApiKeyRecord, ApiKeyRecord.revoked_at.is_(None))
    return [
        ProjectUsage(
            project,
            models.get(project.id, 0),
            datasets.get(project.id, 0),
            engines.get(project.id, 0),
            keys.get(project.id, 0),
        )
        for project in session.scalars(select(ProjectRecord).order_by(ProjectRecord.id))
    ]


def delete_project(session: Session, project_id: str) -> None:
    """Only an empty project goes (no models, datasets or jobs): deleting people's models is done
    model by model, on purpose. Its keys, revoked or not, go with it."""
    project = get_project(session, project_id)
    if project_id == DEFAULT_PROJECT:
        raise ApiError(409, "project_in_use", "the default project cannot be deleted")
    for kind in (ModelRecord, DatasetRecord, JobRecord):
        if session.scalar(select(func.count()).select_from(kind).where(kind.project_id == project_id)):
            raise ApiError(
                409,
                "project_in_use",
                f"project '{project_id}' still holds {kind.__tablename__}; delete them first",
            )
    keys = list(session.scalars(select(ApiKeyRecord).where(ApiKeyRecord.project_id == project_id)))
    _keep_an_admin_key(session, leaving={key.id for key in keys})
    for key in keys:
        session.delete(key)
    session.delete(project)
    session.commit()


def create_key(
    session: Session,
    project_id: str,
    *,
    name: str,
    scopes: list[str],
    infer_rps: float | None = None,
    key: str | None = None,
) -> tuple[ApiKeyRecord, str]:
    """A new key of `project_id` (which must exist), and the key itself: the only time it is known.

    `key` supplies the material (a bootstrap key set by the operator) instead of a random one.
    """
    get_project(session, project_id)
    try:
        scopes = check_scopes(scopes)
    except ValueError as exc:
        raise ApiError(422, "invalid_scopes", str(exc)) from exc
    if infer_rps is not None and infer_rps <= 0:
        raise ApiError(422, "invalid_rate_limit", "infer_rps must be positive (or absent for the default)")
    if key is not None and len(key) < MIN_KEY_LENGTH:
        raise ApiError(422, "weak_api_key", f"a supplied key must be at least {MIN_KEY_LENGTH} characters")
    key = key or generate_key()
    record = ApiKeyRecord(
        project_id=project_id,
        name=name,
        prefix=shown_part(key),
        sha256=hash_key(key),
        scopes=scopes,
        infer_rps=infer_rps,
    )
    session.add(record)
    if session.get(ServerFlagRecord, KEYS_REQUIRED) is None:
        session.add(ServerFlagRecord(name=KEYS_REQUIRED))  # in the key's own transaction
    try:
        session.commit()
    except IntegrityError:
        # Two first keys at once: the other one wrote the flag first. The flag is what matters, and
        # it is there now: store this key without it.
        session.rollback()
        if session.get(ServerFlagRecord, KEYS_REQUIRED) is None:
            raise
        session.add(record)
        session.commit()
    return record, key


def list_keys(session: Session, project_id: str | None = None) -> list[ApiKeyRecord]:
    query = select(ApiKeyRecord).order_by(ApiKeyRecord.created_at)
    if project_id is not None:
        query = query.where(ApiKeyRecord.project_id == project_id)
    return list(session.scalars(query))


def revoke_key(session: Session, key_id: str) -> ApiKeyRecord:
    """Revoked keys stay listed (who had access, and until when); a request with one is refused
    within `auth_cache_ttl_s` on every API process."""
    record = session.get(ApiKeyRecord, key_id)
    if record is None:
        raise ApiError(404, "key_not_found", f"no API key with id '{key_id}'")
    if record.revoked_at is None:
        _keep_an_admin_key(session, leaving={record.id})
        record.revoked_at = utcnow()
        session.commit()
    return record


def _keep_an_admin_key(session: Session, leaving: set[str]) -> None:
    """Refuse (409) a change that would leave the server without an active admin key: nobody could
    manage keys over the API any more, and the server does not re-open (`keys_required`). The
    active keys are read FOR UPDATE (PostgreSQL), so two revocations cannot both pass the check."""
    active = session.scalars(
        select(ApiKeyRecord).where(ApiKeyRecord.revoked_at.is_(None)).with_for_update()
    ).all()
    admins = {key.id for key in active if ADMIN in key.scopes}
    if admins and admins <= leaving:
        raise ApiError(
            409,
            "last_admin_key",
            "this would leave the server without an active admin key: create another admin key "
            "first (POST /v1/admin/keys or `optiforge keys create`), then revoke this one",
        )


def keys_required(session: Session) -> bool:
    """Whether this server has ever had an API key: then every request needs one, for good. A key
    row also counts (a database written before the flag existed, or by hand)."""
    if session.get(ServerFlagRecord, KEYS_REQUIRED) is not None:
        return True
    return session.scalar(select(ApiKeyRecord.id).limit(1)) is not None


def any_active_key(session: Session) -> bool:
    """Whether the server has a key: from the first one on, every request needs one."""
    return (
        session.scalar(select(ApiKeyRecord.id).where(ApiKeyRecord.revoked_at.is_(None)).limit(1)) is not None
    )


def ensure_key(session: Session, key: str, *, name: str = "bootstrap") -> ApiKeyRecord:
    """The operator's key (OPTIFORGE_BOOTSTRAP_API_KEY) as an admin key of the default project,
    made on first start and left alone after (revoking it is honoured: it is not made again)."""
    existing = session.scalar(select(ApiKeyRecord).where(ApiKeyRecord.sha256 == hash_key(key)))
    if existing is not None:
        return existing
    record, _ = create_key(session, DEFAULT_PROJECT, name=name, scopes=[ADMIN], key=key)
    return record


def open_principal() -> Principal:
    """Who a request acts as on a server with no key yet (loopback only)."""
    return Principal(None, DEFAULT_PROJECT, granted([ADMIN]))


class KeyDirectory:
    """Keys to principals, remembered for `ttl_s`: a request with a known key needs no query.

    A revoked key, and the server's first key (which turns open mode off), take effect on every
    API process within `ttl_s`. Once closed, a process remembers it for good: it cannot re-open.
    """

    def __init__(self, database_url: str, ttl_s: float, outage_grace_s: float = 0.0):
        self.database_url, self.ttl_s, self.outage_grace_s = database_url, ttl_s, outage_grace_s
        self._principals: dict[str, tuple[float, Principal | None]] = {}
        self._unknown: dict[str, tuple[float, Principal | None]] = {}
        self._open: tuple[float, bool] | None = None
        self._closed = False  # keys_required seen: final

    def cached(self, key: str | None) -> tuple[bool, Principal | None]:
        """(hit, principal) without a query; `key` None asks whether the server is open."""
        now = time.monotonic()
        if key is None:
            if self._closed:
                return True, None
            if self._open is not None and now - self._open[0] <= self.ttl_s:
                return True, open_principal() if self._open[1] else None
            return False, None
        hashed = hash_key(key)
        entry = self._principals.get(hashed) or self._unknown.get(hashed)
        if entry is not None and now - entry[0] <= self.ttl_s:
            return True, entry[1]
        return False, None

    def known(self, key: str) -> bool:
        """Whether `key` was a valid key when last looked up, however long ago: not a guess, so a
        client throttled for unknown keys may still have it checked (app.api.middleware.failed_keys)."""
        entry = self._principals.get(hash_key(key))
        return entry is not None and entry[1] is not None

    def resolve(self, key: str | None) -> Principal | None:
        """The principal of `key` (None: unknown or revoked), or for no key the open principal
        while the server has never had a key; queries the database (call it off the event loop).
        While the database is unreachable, what was looked up within `outage_grace_s` still holds
        (a key revoked on another replica just before the outage works that much longer)."""
        try:
            return self._resolve(key)
        except Exception as exc:
            entry = self._open if key is None else self._principals.get(hash_key(key))
            if entry is None or not usable_during_outage(exc, entry[0], self.outage_grace_s):
                raise
            if key is None:
                return open_principal() if entry[1] else None
            return entry[1]

    def _resolve(self, key: str | None) -> Principal | None:
        with get_sessionmaker(self.database_url)() as session:
            if key is None:
                is_open = not keys_required(session)
                self._closed = not is_open
                self._open = (time.monotonic(), is_open)
                return open_principal() if is_open else None
            principal = self._lookup(session, key)
        # Unknown keys are remembered apart, in a bounded table: a caller spraying random keys
        # must neither grow memory nor push real keys out of the cache.
        table = self._principals if principal is not None else self._unknown
        if len(table) >= MAX_CACHED_KEYS:
            table.clear()
        table[hash_key(key)] = (time.monotonic(), principal)
        return principal

    @staticmethod
    def _lookup(session: Session, key: str) -> Principal | None:
        record = session.scalar(
            select(ApiKeyRecord).where(
                ApiKeyRecord.sha256 == hash_key(key), ApiKeyRecord.revoked_at.is_(None)
            )
        )
        if record is None:
            return None
        now = utcnow()
        principal = Principal(record.id, record.project_id, granted(record.scopes), record.infer_rps)
        if record.last_used_at is None or now - record.last_used_at > LAST_USED_RESOLUTION:
            record.last_used_at = now
            try:
                session.commit()
            except SQLAlchemyError:  # a full disk or a locked database must not lock keys out
                session.rollback()
                logger.warning("could not record when key %s was last used", principal.key_id, exc_info=True)
        return principal

    def invalidate(self) -> None:
        self._principals.clear()
        self._unknown.clear()
        self._open = None
