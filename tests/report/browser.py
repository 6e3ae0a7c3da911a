"""A headless Chromium driven over the DevTools protocol on a pipe (no port, no websocket
library): open a page offline, collect console errors and network requests, run scripts,
take screenshots.

    python tests/report/browser.py REPORT.html [SHOT.png]

prints the page's load times (navigation start to the first screen's charts drawn, and to
every chart drawn) and any console error.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = [  # headless, offline, no first-run work, no background traffic
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--remote-debugging-pipe",
    "--window-size=1366,900",
]


def _above(fd: int, lowest: int) -> int:
    """`fd` moved to the first free descriptor >= `lowest` (close-on-exec, as os.pipe's)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)
    os.close(fd)
    return moved


def find_chromium() -> str | None:
    """The Chromium binary on PATH (Debian's `chromium` first), or None."""
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


class BrowserError(RuntimeError):
    """Chromium died, timed out, or answered a command with an error."""


class Browser:
    """One headless Chromium with one page; `with Browser() as b: b.open(path)`."""

    def __init__(self, binary: str | None = None, timeout: float = 60.0) -> None:
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError("no Chromium found on PATH")
        self.timeout = timeout
        # Chromium's helper processes may still write to the profile for a moment after the
        # browser is gone; a leftover file there must not fail the test that used it.
        self.profile = tempfile.TemporaryDirectory(
            prefix="qdq-chromium-", ignore_cleanup_errors=True
        )
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()
        # Above fd 10 first, so that moving them onto 3 and 4 in the child cannot clobber one
        # with the other (and dup2 onto another number clears close-on-exec).
        to_child, from_child = (_above(fd, 10) for fd in (to_child, from_child))

        def wire() -> None:  # in the child: the protocol reads fd 3 and writes fd 4
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile.name}", "about:blank"],
            preexec_fn=wire,
            start_new_session=True,  # its own process group: `close` ends every helper too
            close_fds=False,  # os.pipe's ends are not inheritable; fds 3 and 4 are
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.command("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.command("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send(
            "Network.emulateNetworkConditions",
            offline=True,
            latency=0,
            downloadThroughput=-1,
            uploadThroughput=-1,
        )

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # helpers that outlived the browser
            os.killpg(group, signal.SIGKILL)
        os.close(self._write)
        os.close(self._read)
        self.profile.cleanup()

    def command(self, method: str, session: str | None = None, **params: object) -> dict:
        """Send one protocol command and wait for its result; events meanwhile are kept."""
        self._next_id += 1
        message: dict = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def send(self, method: str, **params: object) -> dict:
        """A command to the page's session."""
        return self.command(method, self.session, **params)

    def _receive(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise BrowserError(f"no answer from Chromium in {self.timeout:.0f} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited ({self.process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, path: Path) -> None:
        """Load a local file and wait for its load event."""
        self.events.clear()
        self.send("Page.navigate", url=Path(path).resolve().as_uri())
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._receive())

    def evaluate(self, expression: str) -> object:
        """The value of a JavaScript expression (awaited if it is a promise)."""
        result = self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                errors.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif method == "Runtime.exceptionThrown":
                errors.append(str(params["exceptionDetails"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(params["entry"]["text"])
        return errors

    def requests(self) -> list[str]:
        """URLs the page asked for beyond itself and inline data (none: the report is offline)."""
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
            and not e["params"]["request"]["url"].startswith(("file:", "data:", "blob:"))
        ]

    def screenshot(self, path: Path, width: int = 1366, height: int = 900) -> None:
        """A PNG of the top `width` x `height` pixels of the page."""
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = self.send("Page.captureScreenshot", format="png")
        Path(path).write_bytes(base64.b64decode(shot["data"]))


def main(argv: list[str]) -> int:
    with Browser() as browser:
        browser.open(Path(argv[0]))
        settled = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
        first = browser.evaluate(f"{settled}.then(() => window.qdqDrawn())")
        print(f"{argv[0]}: first screen drawn {first:.0f} ms after navigation start")
        if len(argv) > 1:
            browser.screenshot(Path(argv[1]))
        every = browser.evaluate("window.qdqDrawAll()")
        print(f"{argv[0]}: every chart drawn {every:.0f} ms after navigation start")
        for error in browser.console_errors():
            print(f"console error: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
