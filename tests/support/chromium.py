"""A headless Chromium driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: JSON messages ending in NUL, read on descriptor 3 and written
on 4), so browser tests need no websocket client and no automation package: load a page,
wait until it is ready, collect every JavaScript error and failed request, screenshot it.
Chromium is the Debian package `chromium`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in containers
    "--disable-gpu",
    "--disable-dev-shm-usage",  # a container's /dev/shm is small
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",  # nothing but the page under test on the wire
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]


_ON_3_AND_4 = """\
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.dup2(int(sys.argv[2]), 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


class Chromium:
    """One browser process; `page()` opens a tab. Use as a context manager."""

    def __init__(self, binary: str, workdir: Path) -> None:
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        self.log = workdir / "chromium.log"
        args = [binary, *FLAGS, f"--user-data-dir={workdir / 'chromium-profile'}", "about:blank"]
        with self.log.open("wb") as log:
            # A small Python puts the two pipe ends on the descriptors Chromium expects
            # (a shell's redirections take one-digit descriptors only), then becomes it.
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _ON_3_AND_4, str(commands_read), str(replies_write), *args],
                pass_fds=(commands_read, replies_write),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        os.close(commands_read)
        os.close(replies_write)
        self._next_id = 0
        self._results: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Condition()
        self._closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        pending = b""
        while chunk := os.read(self._replies, 1 << 16):
            pending += chunk
            *messages, pending = pending.split(b"\0")
            with self._lock:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._results[message["id"]] = message
                    else:
                        self.events.append(message)
                self._lock.notify_all()
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        with self._lock:
            self._next_id += 1
            number = self._next_id
        message: dict[str, Any] = {"id": number, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        with self._lock:
            if not self._lock.wait_for(lambda: number in self._results or self._closed, 60):
                raise TimeoutError(f"chromium did not answer {method}")
            if number not in self._results:
                raise RuntimeError(f"chromium exited during {method}:\n{self.output()}")
            reply = self._results.pop(number)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return dict(reply["result"])

    def page(self, width: int = 1280, height: int = 900) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        return Page(self, session["sessionId"], width, height)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close")
                self.proc.wait(10)
            except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        os.close(self._commands)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    """A tab: every JavaScript exception, console error and failed load since the last
    `goto` is in `errors()`."""

    def __init__(self, browser: Chromium, session: str, width: int, height: int) -> None:
        self.browser = browser
        self.session = session
        self.width = width
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.resize(height)
        self._since = len(browser.events)

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.send(method, params, self.session)

    def resize(self, height: int) -> None:
        metrics = {"width": self.width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", metrics)

    def _events(self) -> list[dict[str, Any]]:
        with self.browser._lock:
            return [
                e for e in self.browser.events[self._since :] if e.get("sessionId") == self.session
            ]

    def goto(self, url: str, ready: str, timeout: float = 30) -> None:
        """Load `url` and wait for its load event, then until the JavaScript expression
        `ready` is true."""
        self._since = len(self.browser.events)
        navigation = self.send("Page.navigate", {"url": url})
        if navigation.get("errorText"):
            raise AssertionError(f"{url}: {navigation['errorText']}")
        deadline = time.monotonic() + timeout
        while not any(e["method"] == "Page.loadEventFired" for e in self._events()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not load in {timeout} s: {self.errors()}")
            time.sleep(0.05)
        while not self.evaluate(ready):
            if time.monotonic() > deadline:
                raise AssertionError(f"{url}: not ready in {timeout} s ({ready}): {self.errors()}")
            time.sleep(0.1)

    def evaluate(self, expression: str) -> Any:
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def errors(self) -> list[str]:
        found = []
        for event in self._events():
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details["text"])
            elif event["method"] == "Runtime.consoleAPICalled" and params["type"] in (
                "error",
                "assert",
            ):
                found.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"{entry['text']} {entry.get('url', '')}".strip())
        return found

    def screenshot(self, path: Path) -> None:
        """The whole page, as PNG."""
        self.resize(int(self.evaluate("document.documentElement.scrollHeight")))
        time.sleep(0.3)  # let the page lay out at its new height
        png = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(png))
