"""Browser pages: server-rendered Jinja2, CSRF on every state-changing form."""
