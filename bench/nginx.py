"""nginx (Debian's package) as a plain reverse proxy to the emulator, for comparison.

``GET /proxy/{path}`` goes to the emulator's ``/pub/v2.2/{path}`` with a fixed
``Authorization: Bearer <token>``, HTTP/1.1 keepalive to the upstream. Everything nginx writes
(pid, logs, temp files) stays in the bench's temp folder; it runs in the foreground
(``daemon off``) so the bench owns the process.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG = """\
worker_processes {workers};
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
{user_line}
events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    keepalive_requests 1000000;

    upstream emulator {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}

    server {{
        listen 127.0.0.1:{port};
        location /proxy/ {{
            proxy_pass http://emulator/pub/v2.2/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {token}";
            proxy_buffering on;
        }}
    }}
}}
"""


def write_config(root: Path, *, port: int, upstream_port: int, token: str, workers: int) -> Path:
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    # As root, nginx's workers run as "nobody" unless told otherwise; let them use the temp folder.
    user_line = "user root;" if os.geteuid() == 0 else ""
    path = root / "nginx.conf"
    path.write_text(CONFIG.format(root=root, port=port, upstream_port=upstream_port, token=token, workers=workers,
                                  user_line=user_line))
    return path


def argv(config: Path, root: Path) -> list[str]:
    # -e: the error log from the very start (else nginx opens /var/log/nginx/error.log first).
    return ["nginx", "-e", str(root / "error.log"), "-p", str(root), "-c", str(config)]
