"""/v1/admin: projects and API keys (scope `admin`), and /v1/auth/me: who a key is (any key).

The same operations as the server-side CLI (`optiforge projects …`, `optiforge keys …`), through
app.services.access; every change is in the audit log.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy.orm import Session

from app.api.deps import PrincipalDep, get_db
from app.api.schemas import ApiKeyCreated, ApiKeyIn, ApiKeyOut, PrincipalOut, ProjectIn, ProjectOut
from app.core.audit import audit
from app.core.invalidation import KEYS
from app.core.orm import ApiKeyRecord
from app.services import access

router = APIRouter(prefix="/v1/admin", tags=["admin"])
whoami_router = APIRouter(prefix="/v1/auth", tags=["admin"])


def key_out(record: ApiKeyRecord) -> ApiKeyOut:
    return ApiKeyOut(
        id=record.id,
        project=record.project_id,
        name=record.name,
        prefix=record.prefix,
        scopes=list(record.scopes),
        infer_rps=record.infer_rps,
        created_at=record.created_at,
        last_used_at=record.last_used_at,
        revoked_at=record.revoked_at,
    )


def _project_out(usage: access.ProjectUsage) -> ProjectOut:
    return ProjectOut(
        id=usage.project.id,
        created_at=usage.project.created_at,
        models=usage.models,
        datasets=usage.datasets,
        engines=usage.engines,
        active_keys=usage.active_keys,
    )


@whoami_router.get("/me", response_model=PrincipalOut, summary="The key that asks: its project and scopes")
def whoami(principal: PrincipalDep) -> PrincipalOut:
    return PrincipalOut(
        key_id=principal.key_id,
        project=principal.project_id,
        scopes=sorted(principal.scopes),
        infer_rps=principal.infer_rps,
    )


@router.get("/projects", response_model=list[ProjectOut], summary="Projects, with what each holds")
def list_projects(session: Session = Depends(get_db)) -> list[ProjectOut]:
    return [_project_out(usage) for usage in access.list_projects(session)]


@router.post("/projects", status_code=201, response_model=ProjectOut, summary="Create a project")
def create_project(
    body: ProjectIn, principal: PrincipalDep, session: Session = Depends(get_db)
) -> ProjectOut:
    project = access.create_project(session, body.id)
    audit(principal, "project.create", project.id)
    return ProjectOut(
        id=project.id, created_at=project.created_at, models=0, datasets=0, engines=0, active_keys=0
    )


@router.delete("/projects/{project_id}", status_code=204, summary="Delete an empty project and its keys")
def delete_project(
    project_id: str, request: Request, principal: PrincipalDep, session: Session = Depends(get_db)
) -> Response:
    access.delete_project(session, project_id)
    request.app.state.changes.publish(KEYS)  # on every replica
    audit(principal, "project.delete", project_id)
    return Response(status_code=204)


@router.get("/keys", response_model=list[ApiKeyOut], summary="API keys (never the keys themselves)")
def list_keys(project: str | None = None, session: Session = Depends(get_db)) -> list[ApiKeyOut]:
    return [key_out(record) for record in access.list_keys(session, project)]


@router.post("/keys", status_code=201, response_model=ApiKeyCreated, summary="Create an API key (shown once)")
def create_key(
    body: ApiKeyIn, request: Request, principal: PrincipalDep, session: Session = Depends(get_db)
) -> ApiKeyCreated:
    record, key = access.create_key(
        session, body.project, name=body.name, scopes=list(body.scopes), infer_rps=body.infer_rps
    )
    request.app.state.changes.publish(KEYS)  # the first key ends open mode at once, everywhere
    audit(principal, "key.create", record.id, key_project=record.project_id, scopes=record.scopes)
    return ApiKeyCreated(**key_out(record).model_dump(), key=key)


@router.delete("/keys/{key_id}", response_model=ApiKeyOut, summary="Revoke an API key")
def revoke_key(
    key_id: str, request: Request, principal: PrincipalDep, session: Session = Depends(get_db)
) -> ApiKeyOut:
    """Revoked keys stay listed, with when; every API process refuses the key at once when the
    replicas share Redis (else within `OPTIFORGE_AUTH_CACHE_TTL_S`; this one at once). The server's
    last active admin key cannot be revoked (409 `last_admin_key`): the server never re-opens to
    keyless requests, so nobody could manage keys over the API again."""
    record = access.revoke_key(session, key_id)
    request.app.state.changes.publish(KEYS)  # on every replica
    audit(principal, "key.revoke", key_id, key_project=record.project_id)
    return key_out(record)
