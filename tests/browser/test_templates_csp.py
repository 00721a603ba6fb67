"""The CSP (style-src 'self', script-src 'self') silently drops inline styles and scripts, so no
template may rely on them; this covers the pages the browser tests do not open (invite, ...)."""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
INLINE = [
    (re.compile(r"\sstyle\s*=", re.I), 'a style="" attribute'),
    (re.compile(r"<style\b", re.I), "a <style> element"),
    (re.compile(r"<script\b(?![^>]*\bsrc=)[^>]*>", re.I), "an inline <script>"),
    (re.compile(r"\son[a-z]+\s*=", re.I), "an inline event handler"),
    (re.compile(r"javascript:", re.I), "a javascript: URL"),
]


def test_templates_use_no_inline_styles_or_scripts():
    found = []
    for path in sorted(TEMPLATES.glob("*.html")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in INLINE:
                if pattern.search(line):
                    found.append(f"templates/{path.name}:{number}: {what}: {line.strip()[:100]}")
    assert found == [], "the CSP blocks these; use a class in static/app.css or code in static/app.js:\n" + "\n".join(found)
