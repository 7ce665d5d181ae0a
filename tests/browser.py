"""Headless Chromium for browser tests: Debian's /usr/bin/chromium driven by Playwright.

Never a downloaded browser: `infra/scripts/install-test-packages.sh` installs Debian's
chromium (`make test` runs it). Screenshots go to `test-artifacts/` (git-ignored), where CI
keeps them beside the test log.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("RLHF_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# Chromium's own background connections are refused on a closed network; these keep it quiet.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def chromium_page(width: int = 1600, height: int = 1000) -> Iterator[Any]:
    """A Playwright page in headless Debian Chromium; closed (browser and driver) after."""
    from playwright.sync_api import sync_playwright

    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).is_file():
        raise RuntimeError(
            f"No Chromium at {CHROMIUM}: run infra/scripts/install-test-packages.sh (Debian's "
            "chromium) or set RLHF_TEST_CHROMIUM."
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            try:
                yield page
            except Exception:
                # What the page showed when the test failed, for the log's reader.
                page.screenshot(path=str(_artifact_path("failure")), full_page=True)
                raise
        finally:
            browser.close()


def screenshot(page: Any, name: str, height: int | None = None) -> Path:
    """Save a screenshot of the page (its top `height` pixels when given) as
    test-artifacts/<name>.png; returns its path."""
    path = _artifact_path(name)
    clip = None
    if height is not None:
        clip = {"x": 0, "y": 0, "width": page.viewport_size["width"], "height": height}
    page.screenshot(path=str(path), clip=clip)
    return path


def _artifact_path(name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
