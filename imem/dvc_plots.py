"""An offline HTML template for `dvc plots show` (issue 20): vega, vega-lite and vega-embed inlined.

DVC's default page loads the three libraries from a CDN (``dvc_render.vega.VegaRenderer.SCRIPTS``), so on a
machine without network its interactive plots silently stay blank. DVC fills the page template's
``{plot_divs}`` with the plots and ``{scripts}`` with those CDN tags; this template has no ``{scripts}``
placeholder, so the CDN tags are dropped, and carries the libraries' minified UMD builds itself (taken from
the npm registry's packages at the pinned versions below). ``.dvc/config`` points DVC at it
(``plots.html_template``); the page works wherever it is written or moved (nothing is loaded from a path).

Rebuild after changing a version: ``make plots-template`` (``npm pack`` of the pinned packages, then
``python -m imem.dvc_plots <dir of the unpacked packages>``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from imem.errors import ImemError
from imem.io import write_text

# The versions DVC's own page names are vega 5 / vega-lite 5 / vega-embed 6 (its templates are vega-lite v5
# specs); these are the latest releases of those major versions on npm (2026-12-08).
PACKAGES = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}  # all BSD-3-Clause
TEMPLATE = Path(".dvc") / "plots" / "offline.html"
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # what dvc_render.html.HTML.embed replaces

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inlined for offline use by imem (imem/dvc_plots.py): {versions}.
         Each is (c) the University of Washington Interactive Data Lab, BSD-3-Clause licence. -->
{libraries}
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def build(packages_dir: str | Path) -> str:
    """The template from ``packages_dir/<name>/build/<name>.min.js`` (npm packages unpacked under their
    names), checking each package's version against :data:`PACKAGES`."""
    import json

    packages_dir = Path(packages_dir)
    scripts = []
    for name, version in PACKAGES.items():
        root = packages_dir / name
        try:
            found = json.loads((root / "package.json").read_text())["version"]
            js = (root / "build" / f"{name}.min.js").read_text(encoding="utf-8")
        except (OSError, KeyError, ValueError) as exc:
            raise ImemError(f"{root}: not the npm package {name} ({exc})") from exc
        if found != version:
            raise ImemError(f"{root}: {name} {found}, but imem pins {version} (imem/dvc_plots.py PACKAGES)")
        bad = [p for p in (*PLACEHOLDERS, "</script") if p in js]
        if bad:  # DVC's placeholder replacement or the HTML parser would cut the library
            raise ImemError(f"{root}/build/{name}.min.js contains {bad[0]!r}: cannot be inlined")
        scripts.append(f'    <script data-package="{name}@{version}">\n{js}\n    </script>')
    versions = ", ".join(f"{n}@{v}" for n, v in PACKAGES.items())
    return PAGE.replace("{versions}", versions).replace("{libraries}", "\n".join(scripts))


def inlined_packages(template: str) -> dict[str, str]:
    """``{name: version}`` of the libraries a template carries (its ``data-package`` script tags)."""
    return dict(re.findall(r'<script data-package="([a-z-]+)@([0-9.]+)">', template))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages_dir", help="folder holding the unpacked npm packages vega/, vega-lite/, vega-embed/")
    ap.add_argument("--out", default=str(TEMPLATE), help=f"template to write (default {TEMPLATE})")
    args = ap.parse_args(argv)
    write_text(Path(args.out), build(args.packages_dir))
    print(f"wrote {args.out}: {', '.join(f'{n}@{v}' for n, v in PACKAGES.items())}")


if __name__ == "__main__":
    try:
        main()
    except ImemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
