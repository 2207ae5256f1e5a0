"""A headless Chromium for the tests, driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
no port, no extra client library). Debian's package `chromium`; without it the tests that need it are
skipped, unless EMBEDSERVE_REQUIRE_CHROMIUM=1 (as in CI), which makes that a failure."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

#: Quiet: no sync, updates, first-run or other background traffic of the browser's own, which would
#: blur "the page made no request off loopback"; root (CI) needs --no-sandbox.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--metrics-recording-only",
    "--remote-debugging-pipe",
]


def chromium_bin() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Page:
    """One tab: DevTools commands in its session, and every network request it made."""

    browser: Chromium
    session: str
    requests: list[dict[str, Any]] = field(default_factory=list)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.send(method, session=self.session, **params)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression!r} threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60) -> Any:
        """Polls `expression` until it is truthy; -> its value (generous bound: the machine is shared)."""
        deadline = time.monotonic() + timeout_s
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression!r} still false after {timeout_s} s")
            time.sleep(0.1)
        return value


class Chromium:
    def __init__(self, process: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self.process = process
        self._out = os.fdopen(to_browser, "wb", buffering=0)
        self._in = os.fdopen(from_browser, "rb", buffering=0)
        self._pending = b""
        self._ids = iter(range(1, 1 << 31))
        self._pages: dict[str, Page] = {}

    def _read(self, timeout_s: float = 120) -> dict[str, Any]:
        while b"\0" not in self._pending:
            if not select.select([self._in], [], [], timeout_s)[0]:
                raise RuntimeError(f"chromium sent nothing for {timeout_s} s")
            chunk = self._in.read(1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed the DevTools pipe (exit {self.process.poll()})")
            self._pending += chunk
        message, _, self._pending = self._pending.partition(b"\0")
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        command: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            command["sessionId"] = session
        self._out.write(json.dumps(command).encode() + b"\0")
        while True:
            message = self._read()
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self._event(message)

    def _event(self, message: dict[str, Any]) -> None:
        page = self._pages.get(message.get("sessionId", ""))
        if page is not None and message.get("method") == "Network.requestWillBeSent":
            page.requests.append(message["params"]["request"])

    def open(self, url: str) -> Page:
        """A new tab with network recording on, navigated to `url`."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        page = self._pages[session] = Page(self, session)
        page.send("Network.enable")
        page.send("Page.enable")
        page.send("Page.navigate", url=url)
        return page


@contextmanager
def chromium() -> Iterator[Chromium]:
    binary = chromium_bin()
    if binary is None:
        message = "Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("EMBEDSERVE_REQUIRE_CHROMIUM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    profile = tempfile.mkdtemp(prefix="embedserve-test-chromium-")
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()
    # The browser reads commands on its fd 3 and writes replies on fd 4: bash puts the pipes there (dash
    # takes single-digit fds only).
    process = subprocess.Popen(
        [
            "/bin/bash",
            "-c",
            f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}',
            binary,
            *FLAGS,
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        pass_fds=(to_browser_r, from_browser_w),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(to_browser_r)
    os.close(from_browser_w)
    browser = Chromium(process, to_browser_w, from_browser_r)
    try:
        yield browser
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        browser._out.close()
        browser._in.close()
        shutil.rmtree(profile, ignore_errors=True)
