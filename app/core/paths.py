"""Where the non-Python parts live: templates, static files, migrations.

In a checkout (editable install) they sit beside the `app` package; an image that installs the
package into a virtualenv sets ``SMC_HOME`` to the folder it copied them to.
"""

from __future__ import annotations

import os
from pathlib import Path


def _home() -> Path:
    configured = os.environ.get("SMC_HOME")
    if configured:
        return Path(configured).resolve()
    return Path(__file__).resolve().parents[2]


HOME = _home()
TEMPLATES_DIR = HOME / "templates"
STATIC_DIR = HOME / "static"
MIGRATIONS_DIR = HOME / "migrations"
