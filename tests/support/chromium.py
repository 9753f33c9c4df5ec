"""Headless Chromium for page tests: dump the rendered DOM of a URL, or take a screenshot of it.

Plain command line (no DevTools client, no downloaded browser): `--virtual-time-budget` lets the page's
timers run that many virtual milliseconds (its fetches are real), then Chromium prints the DOM or writes
the screenshot and exits. Every run gets its own profile directory and its own process group, which is
killed by PID if the run overstays its timeout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_binary() -> str | None:
    """The browser to use: `$CHROMIUM`, else the first of the usual names on PATH; None if none."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else shutil.which(explicit)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(extra: list[str], url: str, *, budget_ms: int, timeout_s: float) -> str:
    binary = chromium_binary()
    if binary is None:
        raise RuntimeError("no Chromium found (set $CHROMIUM or install chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        argv = [
            binary,
            "--headless",
            "--no-sandbox",  # tests run as root in containers
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            *extra,
            url,
        ]
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its helpers share the group: one killpg stops them all
        )
        try:
            out, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise RuntimeError(f"Chromium did not finish within {timeout_s:g} s") from None
        finally:
            # Helpers that outlive a normal exit (rare) go with the group too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        if process.returncode != 0:
            raise RuntimeError(
                f"Chromium exited {process.returncode}: {err.decode(errors='replace')[-2000:]}"
            )
        return out.decode(errors="replace")


def dump_dom(url: str, *, budget_ms: int = 5000, timeout_s: float = 60) -> str:
    """The DOM of `url` as serialised after `budget_ms` of virtual time."""
    return _run(["--dump-dom"], url, budget_ms=budget_ms, timeout_s=timeout_s)


def screenshot(
    url: str,
    path: Path,
    *,
    size: tuple[int, int] = (1280, 900),
    budget_ms: int = 5000,
    timeout_s: float = 60,
) -> Path:
    """A PNG of the viewport (`size`) of `url` after `budget_ms` of virtual time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [f"--screenshot={path}", f"--window-size={size[0]},{size[1]}"],
        url,
        budget_ms=budget_ms,
        timeout_s=timeout_s,
    )
    if not path.exists() or path.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot to {path}")
    return path


class Element:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag = tag
        self.attrs = attrs
        self.text = ""

    def __repr__(self) -> str:
        return f"<{self.tag} {self.attrs} {self.text[:60]!r}>"


class Dom(HTMLParser):
    """A flat list of the elements of a serialised DOM, each with its attributes and all text inside it."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"})

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self._open) - 1, -1, -1):
            if self._open[index].tag == tag:
                del self._open[index:]
                return

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element.text += data

    def find(self, tag: str | None = None, **attrs: str) -> list[Element]:
        """Elements with that tag (any if None) whose attributes include `attrs` (`data_x` = `data-x`)."""
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [
            e
            for e in self.elements
            if (tag is None or e.tag == tag) and all(e.attrs.get(k) == v for k, v in wanted.items())
        ]

    def one(self, tag: str | None = None, **attrs: str) -> Element:
        found = self.find(tag, **attrs)
        if len(found) != 1:
            raise AssertionError(f"expected one {tag or 'element'} with {attrs}, found {len(found)}")
        return found[0]
