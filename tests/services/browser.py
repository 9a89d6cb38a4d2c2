"""Headless Chromium screenshots of web pages (the MLflow UI) for tests.

Follows the team's tested shell helper (shared/services/ui-screenshot.sh): Debian's
``chromium`` (installed with apt-get when missing and we are root), a throw-away profile
and XDG dirs, flags that keep it off the internet, a virtual time budget so single-page
apps fetch and draw before the capture, and ``--dump-dom`` for the rendered DOM text.

    shot = screenshot("http://127.0.0.1:PORT/#/experiments/1/runs/ID?workflowType=machine_learning",
                      tmp_path / "run.png", size=(1280, 1300))
    assert "my-run" in shot.dom

Gotchas seen here: Chromium refuses some ports (``ERR_UNSAFE_PORT``: 6000, 6665-6669,
10080, ...); a fresh profile opens the MLflow UI in its GenAI mode unless the URL ends in
``?workflowType=machine_learning``; 4-8 s per shot on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or showed its own error page."""


@dataclass
class Screenshot:
    png: Path
    dom: str

    def pixels(self) -> np.ndarray:
        from PIL import Image

        with Image.open(self.png) as image:
            return np.asarray(image.convert("RGB"))

    def is_blank(self) -> bool:
        """True when the picture is (almost) one colour: nothing was drawn."""
        pixels = self.pixels().reshape(-1, 3)
        return len(np.unique(pixels[:: max(1, len(pixels) // 20000)], axis=0)) < 8


def find_chromium(install: bool = True) -> str:
    """Path of chromium; installs Debian's package when missing (root only)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        command = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(command, capture_output=True, env=env, check=False).returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, check=False)
            subprocess.run(command, capture_output=True, env=env, check=False)
        found = shutil.which("chromium")
        if found:
            return found
    raise BrowserError("chromium not found (apt-get install chromium)")


def screenshot(
    url: str, png: Path, size: tuple[int, int] = (1280, 800), budget_ms: int = 10000, timeout_s: float = 90
) -> Screenshot:
    """Render ``url`` headless, write ``png``, return it with the rendered DOM."""
    chromium = find_chromium()
    png = Path(png).resolve()
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="browser-") as scratch:
        home = Path(scratch)
        for sub in ("config", "cache", "profile"):
            (home / sub).mkdir()
        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
               "XDG_CACHE_HOME": str(home / "cache")}  # fmt: skip
        command = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={home / 'profile'}", "--no-first-run", "--no-default-browser-check",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-quic", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
            f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}",
            "--run-all-compositor-stages-before-draw", f"--screenshot={png}", "--dump-dom", url,
        ]  # fmt: skip
        try:
            result = subprocess.run(
                command, cwd=home, env=env, capture_output=True, text=True, timeout=timeout_s,
                stdin=subprocess.DEVNULL, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as error:
            raise BrowserError(f"chromium timed out after {timeout_s:.0f} s on {url}") from error
    if result.returncode != 0 or not png.exists() or png.stat().st_size == 0:
        raise BrowserError(f"chromium exited {result.returncode} on {url}:\n{result.stderr[-3000:]}")
    dom = result.stdout
    if 'class="neterror"' in dom:
        raise BrowserError(f"chromium could not load {url} (its error page is in {png})")
    return Screenshot(png, dom)
