"""Nothing on the built site hides behind a horizontal scroll bar at a 1280 px wide window.

A headless Chromium opens every page of the site that `nox -s docs` built (its path in $CFPO_SITE) and lists each
element of the page that scrolls sideways (``scrollWidth > clientWidth`` with ``overflow-x: auto | scroll``: a wide
table, a long code line), and any page wider than the window. Needs a Chromium / Chrome on PATH (or its path in
$CFPO_CHROMIUM); without one, or without a built site, the test is skipped with the reason.

By hand, with the offenders listed per page: ``python tests/docs/test_site_layout.py .nox/docs/tmp/site``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WIDTH = 1280
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

#: run in the page once it has loaded (and Material's scripts have wrapped its tables): what scrolls sideways
PROBE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const found = [];
  const name = (el) => {
    const text = (el.innerText || "").trim().split("\\n")[0].slice(0, 70);
    return `${el.tagName.toLowerCase()}${el.className ? "." + String(el.className).split(" ")[0] : ""}`
      + ` (${el.scrollWidth} > ${el.clientWidth} px): ${text}`;
  };
  for (const el of document.querySelectorAll(".md-content *")) {
    const overflow = getComputedStyle(el).overflowX;
    if ((overflow === "auto" || overflow === "scroll") && el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1)
      found.push(name(el));
  }
  const page = document.documentElement;
  if (page.scrollWidth > window.innerWidth + 1) found.push(`the page (${page.scrollWidth} > ${window.innerWidth} px)`);
  const out = document.createElement("pre");
  out.id = "cfpo-layout-probe";
  out.textContent = JSON.stringify({width: window.innerWidth, found: found});
  document.body.appendChild(out);
}, 300));
</script>"""
RESULT = re.compile(r'<pre id="cfpo-layout-probe">(.*?)</pre>', re.S)


def find_browser() -> str | None:
    """A Chromium / Chrome that runs headless: $CFPO_CHROMIUM, else the first of BROWSERS on PATH."""
    return os.environ.get("CFPO_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)


def probe(site: Path, browser: str, width: int = WIDTH) -> dict[str, list[str]]:
    """{page (relative to the site): what scrolls sideways on it} for every HTML page of ``site``."""
    import html

    results: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "site"
        shutil.copytree(site, copy)
        pages = sorted(p for p in copy.rglob("*.html") if p.name != "404.html")
        for page in pages:
            text = page.read_text(encoding="utf-8")
            page.write_text(text.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
        for page in pages:
            out = subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--user-data-dir={tmp}/profile", f"--window-size={width},1000", "--virtual-time-budget=5000",
                 "--dump-dom", page.as_uri()],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            match = RESULT.search(out.stdout)
            relative = page.relative_to(copy).as_posix()
            assert match, f"{relative}: the probe did not report (chromium exit {out.returncode}): {out.stderr[-500:]}"
            report = json.loads(html.unescape(match[1]))
            assert report["width"] == width, f"{relative}: the window is {report['width']} px wide, not {width}"
            results[relative] = report["found"]
    return results


def test_no_page_scrolls_sideways_at_1280px():
    import pytest

    site = os.environ.get("CFPO_SITE")
    if not site or not (Path(site) / "index.html").is_file():
        pytest.skip("no built site: `nox -s docs` builds one and sets CFPO_SITE")
    browser = find_browser()
    if browser is None:
        pytest.skip(f"no headless browser: none of {', '.join(BROWSERS)} on PATH and no $CFPO_CHROMIUM "
                    "(Debian: apt-get install chromium)")  # fmt: skip
    results = probe(Path(site), browser)
    assert len(results) > 15, f"the site has only {len(results)} pages: the wrong folder?"
    hidden = {page: found for page, found in results.items() if found}
    assert not hidden, "content behind a horizontal scroll bar at 1280 px:\n" + "\n".join(
        f"{page}: {item}" for page, found in hidden.items() for item in found
    )


if __name__ == "__main__":
    browser = find_browser()
    if browser is None:
        sys.exit("no Chromium / Chrome found (set CFPO_CHROMIUM)")
    results = probe(Path(sys.argv[1] if len(sys.argv) > 1 else ".nox/docs/tmp/site"), browser)
    for page, found in results.items():
        print(f"{page}: {len(found)}")
        for item in found:
            print("    " + item)
    pages = sum(bool(found) for found in results.values())
    print(f"total: {sum(map(len, results.values()))} on {pages} of {len(results)} pages")
