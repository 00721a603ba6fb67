"""Browser pages: server-rendered Jinja2, CSRF on every state-changing form."""


from app.web import audit_pages, auth_pages, connect_pages, inbox_pages, key_pages, link_pages, people_pages, tenant_pages

# Every browser router, in the order the app includes them (tests walk them all).
ROUTERS = [m.router for m in (auth_pages, link_pages, connect_pages, tenant_pages, key_pages, audit_pages, inbox_pages, people_pages)]
