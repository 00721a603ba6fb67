"""The connected account: teams (inboxes), users, the current user and organization."""

from __future__ import annotations

from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from salesmsg_emulator.api.guard import API_PREFIX, ApiContext, api_endpoint, not_found
from salesmsg_emulator.api.inputs import int_param
from salesmsg_emulator.payloads import org_payload, team_payload, user_payload

MAX_LIMIT = 100


def _window(ctx: ApiContext) -> tuple[int, int]:
    params = ctx.request.query_params
    offset = int_param(params.get("offset"), "offset", 0)
    limit = int_param(params.get("limit"), "limit", MAX_LIMIT, minimum=1, maximum=MAX_LIMIT)
    return offset, limit


@api_endpoint("teams:read", observed_500=True)
async def list_teams(ctx: ApiContext) -> Response:
    offset, limit = _window(ctx)
    with ctx.store.read():
        return JSONResponse([team_payload(t) for t in ctx.store.org_teams(ctx.org_id)[offset : offset + limit]])


@api_endpoint("users:read")
async def list_users(ctx: ApiContext) -> Response:
    offset, limit = _window(ctx)
    with ctx.store.read():
        return JSONResponse([user_payload(u) for u in ctx.store.org_users(ctx.org_id)[offset : offset + limit]])


@api_endpoint("users:read")
async def current_user(ctx: ApiContext) -> Response:
    with ctx.store.read():
        user = ctx.store.org_user(ctx.org_id, ctx.user_id)
        org = ctx.store.orgs.get(ctx.org_id)
        if user is None or org is None:
            raise not_found("User")
        return JSONResponse(user_payload(user) | {"organization": {"id": org.id, "name": org.name}})


@api_endpoint("organizations:read")
async def organization_members(ctx: ApiContext) -> Response:
    """``GET /organization/members``: a bare array of the org's users, not paginated."""
    with ctx.store.read():
        return JSONResponse([user_payload(u) for u in ctx.store.org_users(ctx.org_id)])


@api_endpoint("organizations:read")
async def current_organization(ctx: ApiContext) -> Response:
    with ctx.store.read():
        org = ctx.store.orgs.get(ctx.org_id)
        if org is None:
            raise not_found("Organization")
        return JSONResponse(org_payload(org, ctx.store))


def routes() -> list[Route]:
    p = API_PREFIX
    return [
        Route(f"{p}/teams", list_teams, methods=["GET"]),
        Route(f"{p}/users", list_users, methods=["GET"]),
        Route(f"{p}/users/me", current_user, methods=["GET"]),
        Route(f"{p}/user", current_user, methods=["GET"]),
        Route(f"{p}/organization/members", organization_members, methods=["GET"]),
        Route(f"{p}/organization/current", current_organization, methods=["GET"]),
    ]
