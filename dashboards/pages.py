"""The HTML of the web pages: Jinja2 templates under ``dashboards/templates``.

The pages are thin: the server renders the frame (titles, ids, links, settings the scripts
need) and the scripts under ``dashboards/static`` fetch the JSON API and the figure endpoints
and draw them with Plotly. plotly.js itself comes from the installed ``plotly`` package, so the
pages work without a network.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import plotly

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
#: The minified plotly.js bundled with the Python package (same version as the figures' JSON).
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
#: Pages a template may name in ``render``.
PAGES = ("studies.html", "study.html", "trial.html", "error.html")


@cache
def environment() -> jinja2.Environment:
    """The Jinja2 environment of the pages (HTML autoescaping on, undefined names an error)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=jinja2.select_autoescape(("html",)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(page: str, **context: Any) -> str:
    """The HTML of ``page`` (one of :data:`PAGES`) with ``context`` as template variables.

    Every page takes ``title``; ``study.html`` takes ``study_id``; ``trial.html`` takes
    ``study_id``, ``number`` and ``mlflow_ui_url`` (``None`` when no tracking UI is known);
    ``error.html`` takes ``message`` and ``study_id`` (or ``None``).
    """
    if page not in PAGES:
        raise ValueError(f"unknown page {page!r}; the pages are {', '.join(PAGES)}")
    return environment().get_template(page).render(plotly_version=plotly.__version__, **context)
