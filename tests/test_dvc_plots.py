"""`dvc plots show` works offline (issue 20): the committed page template inlines vega, vega-lite and
vega-embed at the pinned versions, DVC uses it, and headless Chromium with every host unresolvable draws each
interactive plot (while DVC's own CDN page draws none)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imem import dvc_plots
from imem.errors import ImemError

ROOT = Path(__file__).resolve().parents[1]
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _fake_packages(tmp: Path, versions: dict | None = None, body: str = "var x = 1;") -> Path:
    for name, version in (versions or dvc_plots.PACKAGES).items():
        (tmp / name / "build").mkdir(parents=True)
        (tmp / name / "package.json").write_text(json.dumps({"name": name, "version": version}))
        (tmp / name / "build" / f"{name}.min.js").write_text(f"/* {name} */ {body}")
    return tmp


def test_the_template_inlines_each_pinned_library_and_keeps_dvcs_plot_placeholder(tmp_path):
    page = dvc_plots.build(_fake_packages(tmp_path))
    assert dvc_plots.inlined_packages(page) == dvc_plots.PACKAGES
    assert "{plot_divs}" in page and "{refresh_tag}" in page
    assert "{scripts}" not in page  # DVC's CDN script tags have nowhere to go
    for name in dvc_plots.PACKAGES:
        assert f"/* {name} */ var x = 1;" in page
    # the order vega-embed needs: vega, then vega-lite, then vega-embed
    assert [m for m in re.findall(r'data-package="([a-z-]+)@', page)] == ["vega", "vega-lite", "vega-embed"]


def test_a_wrong_version_or_an_uninlinable_library_is_refused(tmp_path):
    wrong = {**dvc_plots.PACKAGES, "vega-lite": "6.0.0"}
    with pytest.raises(ImemError, match=r"vega-lite 6\.0\.0, but imem pins 5\.23\.0"):
        dvc_plots.build(_fake_packages(tmp_path / "a", wrong))
    with pytest.raises(ImemError, match=r"vega.min.js contains '</script'"):
        dvc_plots.build(_fake_packages(tmp_path / "b", body="s = '</script>';"))
    with pytest.raises(ImemError, match=r"contains '\{scripts\}'"):
        dvc_plots.build(_fake_packages(tmp_path / "c", body="s = '{scripts}';"))
    with pytest.raises(ImemError, match=r"not the npm package vega"):
        dvc_plots.build(tmp_path / "missing")


def test_the_committed_template_is_the_one_dvc_uses_and_loads_nothing_from_the_network():
    page = (ROOT / dvc_plots.TEMPLATE).read_text(encoding="utf-8")
    assert dvc_plots.inlined_packages(page) == dvc_plots.PACKAGES
    assert "{plot_divs}" in page and "{scripts}" not in page
    assert not re.search(r"<script[^>]+src=", page)  # every library is inline
    assert len(page) > 500_000  # the three minified builds, not placeholders
    config = (ROOT / ".dvc" / "config").read_text()
    assert re.search(r"\[plots\]\s+html_template = plots/offline\.html", config)
    assert "/dvc_plots/" in (ROOT / ".gitignore").read_text().splitlines()


def _render(page: Path) -> str:
    """The page's DOM after its scripts ran in headless Chromium with every host name unresolvable."""
    out = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND",
                          "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (.ci/run installs Debian's chromium)")
def test_every_interactive_plot_renders_offline_in_headless_chromium(tmp_path):
    from dvc_render.html import PAGE_HTML  # DVC's own page: CDN script tags through {scripts}

    dvc = [sys.executable, "-m", "dvc", "plots", "show", "dvc.yaml"]
    subprocess.run([*dvc, "-o", str(tmp_path / "offline")], cwd=ROOT, check=True, capture_output=True)
    (tmp_path / "cdn.html").write_text(PAGE_HTML)
    subprocess.run([*dvc, "-o", str(tmp_path / "cdn"), "--html-template", str(tmp_path / "cdn.html")], cwd=ROOT,
                   check=True, capture_output=True)
    offline = (tmp_path / "offline" / "index.html").read_text(encoding="utf-8")
    # the interactive plots DVC wrote into the page with data: a plot whose files are absent (the predictions,
    # before `make repro` has run in a fresh clone) gets an empty spec, which nothing could draw
    wanted = {pid for spec, pid in re.findall(r"var spec = (.*?);\s*vegaEmbed\('#([^']+)'", offline, re.S)
              if spec.strip() != "{}"}
    assert len(wanted) >= 5 and "cdn.jsdelivr.net" not in offline
    dom = _render(tmp_path / "offline" / "index.html")
    # vega-embed turns each plot's div into div.vega-embed > div.chart-wrapper > canvas (the drawn marks)
    drawn = set(re.findall(r'<div id="([^"]+)" class="vega-embed[^"]*"><div class="chart-wrapper"[^>]*>'
                           r'<canvas width="[1-9]', dom))
    assert drawn == wanted, f"{len(drawn)} of {len(wanted)} plots drawn; missing {sorted(wanted - drawn)}"
    # the control: DVC's default page needs the CDN, so without network it draws nothing
    assert "cdn.jsdelivr.net" in (tmp_path / "cdn" / "index.html").read_text(encoding="utf-8")
    assert "<canvas" not in _render(tmp_path / "cdn" / "index.html")
