"""nginx (Debian's package): a plain reverse proxy for comparison, and a fast static upstream.

``write_config``: ``GET /proxy/{path}`` goes to the upstream's ``/pub/v2.2/{path}`` (the emulator,
or the fast upstream) with a fixed ``Authorization: Bearer <token>``, HTTP/1.1 keepalive to the
upstream.

``write_static_config``: the "fast upstream" of the ``fast`` section. ``GET {path}`` (any query
string) answers 200 with one recorded body and its Content-Type, read from a file (sendfile, the
file's descriptor cached); anything else 404. No emulator behind it: it costs a few microseconds
of CPU per request, so what sits in front of it is what gets measured.

Everything nginx writes (pid, logs, temp files) stays in the given folder of the bench's temp
folder; it runs in the foreground (``daemon off``) so the bench owns the process.
"""

from __future__ import annotations

import os
from pathlib import Path

# What every nginx of the bench shares: foreground, its own pid, logs and temp files in ``root``.
_PREAMBLE = """\
worker_processes {workers};
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
{user_line}
events {{
    worker_connections {connections};
}}

http {{
    access_log off;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    keepalive_requests 1000000;
"""

CONFIG = _PREAMBLE.replace("{connections}", "1024") + """\

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


def _user_line(root: Path) -> str:
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    # As root, nginx's workers run as "nobody" unless told otherwise; let them use the temp folder.
    return "user root;" if os.geteuid() == 0 else ""


def write_config(root: Path, *, port: int, upstream_port: int, token: str, workers: int) -> Path:
    user_line = _user_line(root)
    path = root / "nginx.conf"
    path.write_text(CONFIG.format(root=root, port=port, upstream_port=upstream_port, token=token, workers=workers,
                                  user_line=user_line))
    return path


STATIC_CONFIG = _PREAMBLE.replace("{connections}", "4096") + """\
    keepalive_timeout 75s;
    sendfile on;
    tcp_nopush on;
    open_file_cache max=16 inactive=3600s;
    open_file_cache_valid 3600s;
    server_tokens off;
    etag off;

    server {{
        listen 127.0.0.1:{port};
        location = {path} {{
            limit_except GET {{ deny all; }}
            types {{ }}
            default_type "{content_type}";
            alias {body};
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


def write_static_config(root: Path, *, port: int, path: str, body: Path, content_type: str, workers: int) -> Path:
    """The fast upstream: ``GET {path}`` (any query) answers 200, ``body``'s bytes, ``content_type``."""
    if '"' in content_type or "\\" in content_type or not path.startswith("/"):
        raise ValueError(f"cannot put {content_type!r} / {path!r} in an nginx config")
    user_line = _user_line(root)
    config = root / "nginx.conf"
    config.write_text(STATIC_CONFIG.format(root=root, port=port, path=path, body=body.resolve(), content_type=content_type,
                                           workers=workers, user_line=user_line))
    return config


def argv(config: Path, root: Path) -> list[str]:
    # -e: the error log from the very start (else nginx opens /var/log/nginx/error.log first).
    return ["nginx", "-e", str(root / "error.log"), "-p", str(root), "-c", str(config)]
