"""Operator commands: tenants, users (and recovering a locked-out one), master keys, the audit chain."""

from __future__ import annotations

import sys
from getpass import getpass
from typing import Annotated, Any, Optional

import typer

from app.audit import audit_log
from app.cli.environment import CLI_ACTOR, emit, run
from app.identity import api_keys, mfa, password_resets, people
from app.runtime import Runtime
from app.tenants import registry
from app.vault import tenant_keys

tenant_cli = typer.Typer(no_args_is_help=True, help="Tenants (one per customer org).")
user_cli = typer.Typer(no_args_is_help=True, help="People who sign in to the dashboard.")
keys_cli = typer.Typer(no_args_is_help=True, help="Master keys and tenant data keys.")
audit_cli = typer.Typer(no_args_is_help=True, help="The hash-chained audit log.")
api_key_cli = typer.Typer(no_args_is_help=True, help="API keys for internal services.")

def tenant_dict(tenant, connection=None) -> dict[str, Any]:
    return {
        "id": str(tenant.id),
        "slug": tenant.slug,
        "name": tenant.name,
        "hipaa": tenant.hipaa,
        "baa_signed": tenant.baa_signed_at is not None,
        "baa_signed_at": tenant.baa_signed_at.isoformat() if tenant.baa_signed_at else None,
        "connection": connection.status if connection is not None else "not_connected",
    }


@tenant_cli.command("create")
def tenant_create(
    slug: Annotated[str, typer.Option(help="URL-safe id: lowercase letters, digits, hyphens")],
    name: Annotated[str, typer.Option(help="Organization name")],
    hipaa: Annotated[bool, typer.Option("--hipaa/--no-hipaa", help="HIPAA organization (default: yes, fail closed)")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Create a tenant (HIPAA unless --no-hipaa)."""

    async def go(runtime: Runtime) -> dict[str, Any]:
        async with runtime.db.session() as session:
            tenant = await registry.create_tenant(session, keyring=runtime.keyring, slug=slug, name=name, hipaa=hipaa, actor=CLI_ACTOR)
            return tenant_dict(tenant)

    created = run(go)
    emit(created, as_json, f"created tenant {created['slug']} ({created['id']}), HIPAA: {created['hipaa']}")


@tenant_cli.command("list")
def tenant_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """List every tenant with its HIPAA, BAA and connection state."""

    async def go(runtime: Runtime) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        cursor = None
        async with runtime.db.session() as session:
            while True:
                page = await registry.list_tenants(session, cursor=cursor, limit=200)
                found += [tenant_dict(r.tenant, r.connection) for r in page.rows]
                if not page.next_cursor:
                    return found
                cursor = page.next_cursor

    rows = run(go)
    lines = [f"{r['slug']:30} hipaa={str(r['hipaa']).lower():5} baa={str(r['baa_signed']).lower():5} {r['connection']}" for r in rows]
    emit(rows, as_json, "\n".join(lines) or "no tenants")


@tenant_cli.command("delete")
def tenant_delete(
    slug: Annotated[str, typer.Option(help="The tenant to delete")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation")] = False,
) -> None:
    """Delete a tenant: its data key is shredded, so its tokens can never be read again."""
    if not yes:
        typer.confirm(f"Delete {slug} and shred its tokens?", abort=True)

    async def go(runtime: Runtime) -> None:
        async with runtime.db.session() as session:
            tenant = await registry.get_tenant(session, slug)
            await registry.delete_tenant(session, tenant, actor=CLI_ACTOR)

    run(go)
    typer.echo(f"deleted {slug}; its data key is shredded")


@user_cli.command("create")
def user_create(
    email: Annotated[str, typer.Option(help="Sign-in email")],
    role: Annotated[str, typer.Option(help="operator or org_admin")] = "operator",
    tenant: Annotated[Optional[str], typer.Option(help="Tenant slug (org_admin only)")] = None,
    name: Annotated[str, typer.Option(help="Display name")] = "",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from standard input")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Create a user; the password is prompted for (or read from stdin), never an argument."""
    password = sys.stdin.readline().rstrip("\n") if password_stdin else getpass("Password (12+ characters): ")
    if not password_stdin and getpass("Again: ") != password:
        typer.echo("error: the passwords differ", err=True)
        raise typer.Exit(1)

    async def go(runtime: Runtime) -> dict[str, Any]:
        async with runtime.db.session() as session:
            tenant_row = await registry.get_tenant(session, tenant) if tenant else None
            user = await people.create_user(
                session, email=email, password=password, role=role, tenant=tenant_row, name=name, actor=CLI_ACTOR
            )
            return {"id": str(user.id), "email": user.email, "role": user.role, "tenant": tenant}

    created = run(go)
    emit(created, as_json, f"created {created['role']} {created['email']}")


@keys_cli.command("rotate")
def keys_rotate(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Rewrap every tenant data key under the first key of SMC_MASTER_KEYS (safe while serving)."""

    async def go(runtime: Runtime) -> tuple[tenant_keys.RotateReport, mfa.KeyReport]:
        return await tenant_keys.rewrap_all(runtime.db, runtime.keyring), await mfa.rewrap_all(runtime.db, runtime.keyring)

    report, secrets = run(go)
    data = {**report.__dict__, "mfa_secrets_rewrapped": secrets.rewrapped, "mfa_secrets_already_current": secrets.already_current}
    emit(data, as_json, f"rewrapped {report.rewrapped} data keys under {report.primary}; {report.already_current} already were; "
         f"resealed {secrets.rewrapped} MFA secrets ({secrets.already_current} already were)")


@keys_cli.command("verify")
def keys_verify(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Open every data key and every sealed secret; exit 1 if anything fails."""

    async def go(runtime: Runtime) -> tuple[tenant_keys.VerifyReport, mfa.KeyReport]:
        return await tenant_keys.verify_all(runtime.db, runtime.data_keys), await mfa.verify_all(runtime.db, runtime.keyring)

    report, secrets = run(go)
    failures = report.failures + secrets.failures
    ok = not failures
    data = {"ok": ok, "tenants": report.tenants, "secrets": report.secrets, "mfa_secrets": secrets.opened + len(secrets.failures),
            "by_master_key": report.by_master_key, "failures": failures}
    text = (f"{report.tenants} tenants, {report.secrets} secrets, {data['mfa_secrets']} MFA secrets, "
            f"data keys by master key {report.by_master_key}: ") + ("all open" if ok else "FAILURES:\n  " + "\n  ".join(failures))
    emit(data, as_json, text)
    if not ok:
        raise typer.Exit(1)


@audit_cli.command("verify")
def audit_verify(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Recompute the audit chain; exit 1 at the first row that was altered, removed or reordered."""

    async def go(runtime: Runtime) -> audit_log.ChainReport:
        async with runtime.db.session() as session:
            return await audit_log.verify_chain(session)

    report = run(go)
    data = {"ok": report.ok, "rows": report.rows, "broken_at": report.broken_at, "reason": report.reason}
    emit(data, as_json, f"{report.rows} rows, chain intact" if report.ok else f"chain broken at row {report.broken_at}: {report.reason}")
    if not report.ok:
        raise typer.Exit(1)


def key_dict(row, key: str | None = None, tenant_slugs: list[str] | None = None) -> dict[str, Any]:
    data = {
        "id": str(row.id),
        "name": row.name,
        "prefix": row.prefix,
        "tenants": "all" if row.all_tenants else tenant_slugs or [],
        "read_only": row.read_only,
        "operator": row.operator,
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "revoked": row.revoked_at is not None,
        "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None,
    }
    if key is not None:
        data["key"] = key
    return data


@api_key_cli.command("create")
def api_key_create(
    name: Annotated[str, typer.Option(help="What the key is for")],
    tenant: Annotated[Optional[list[str]], typer.Option("--tenant", help="Limit to this tenant (repeat); all when omitted")] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="GET and HEAD only")] = False,
    operator: Annotated[bool, typer.Option("--operator", help="May also manage tenants, HIPAA and BAA")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Create an API key; the key is printed once and stored only as a hash."""

    async def go(runtime: Runtime) -> dict[str, Any]:
        async with runtime.db.session() as session:
            row, key = await api_keys.create_api_key(
                session, name=name, tenant_refs=list(tenant) if tenant else None, read_only=read_only, operator=operator, actor=CLI_ACTOR
            )
            return key_dict(row, key, list(tenant) if tenant else None)

    created = run(go)
    emit(created, as_json, f"{created['key']}\n(shown once) key {created['prefix']} for {created['tenants']}")


@api_key_cli.command("list")
def api_key_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """List API keys (never the keys themselves)."""

    async def go(runtime: Runtime) -> list[dict[str, Any]]:
        async with runtime.db.session() as session:
            return [key_dict(row) for row in await api_keys.list_keys(session)]

    rows = run(go)
    lines = [f"{r['id']}  {r['prefix']}  {r['name']:24} revoked={str(r['revoked']).lower()}" for r in rows]
    emit(rows, as_json, "\n".join(lines) or "no keys")


@api_key_cli.command("revoke")
def api_key_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (see `api-key list`)")]) -> None:
    """Revoke a key: refused from the next request on, in every process."""
    import uuid as _uuid

    try:
        parsed = _uuid.UUID(key_id)
    except ValueError:
        typer.echo("error: give the key's id (a UUID) from `api-key list`", err=True)
        raise typer.Exit(2) from None

    async def go(runtime: Runtime) -> None:
        async with runtime.db.session() as session:
            await api_keys.revoke_api_key(session, key_id=parsed, actor=CLI_ACTOR)

    run(go)
    typer.echo(f"revoked {key_id}")


async def _user_by_email(session, email: str):
    return await people.find_user(session, email)


@user_cli.command("reset-mfa")
def user_reset_mfa(email: Annotated[str, typer.Argument(help="The person's sign-in email")]) -> None:
    """Remove a person's two-step sign-in (lost device, or the last operator locked out): their
    authenticator and recovery codes stop working, their sessions end; they enrol again after signing in."""

    async def go(runtime: Runtime) -> None:
        async with runtime.db.session() as session:
            user = await _user_by_email(session, email)
            await mfa.reset(session, user=user, actor=CLI_ACTOR)

    run(go)
    typer.echo(f"two-step sign-in removed for {email}; their sessions have ended")


@user_cli.command("reset-password-link")
def user_reset_password_link(email: Annotated[str, typer.Argument(help="The person's sign-in email")]) -> None:
    """Print a password reset link for a person, once: single use, expiring after
    SMC_PASSWORD_RESET_MINUTES; any older link of theirs stops working."""

    async def go(runtime: Runtime) -> tuple[str, str]:
        async with runtime.db.session() as session:
            user = await _user_by_email(session, email)
            reset, token = await password_resets.issue(
                session, user=user, minutes=runtime.settings.password_reset_minutes, actor=CLI_ACTOR
            )
            return f"{runtime.settings.public_url}/reset/{token}", reset.expires_at.isoformat()

    url, expires_at = run(go)
    typer.echo(url)
    typer.echo(f"(shown once) single use, expires {expires_at}", err=True)
