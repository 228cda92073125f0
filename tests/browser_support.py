"""Drive headless Chromium from a test over the DevTools protocol, through --remote-debugging-pipe
(JSON messages separated by NUL on file descriptors 3 and 4): no WebDriver, no websocket library,
no browser download, only the distribution's `chromium` package (.ci/run installs it).

    with Browser.start(binary, tmp_path) as browser:
        browser.open("file:///tmp/report.html")
        browser.click("#category-filter button[data-category=wrong_answer]")
        rows = browser.evaluate("document.querySelectorAll('tr.sample').length")
        png = browser.screenshot()
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, process: subprocess.Popen, commands: int, events: int) -> None:
        self._process, self._commands, self._events = process, commands, events
        self._buffer, self._pending, self._next_id, self._session = b"", [], 0, None

    @classmethod
    def start(cls, binary: str, profile: Path, width: int = 1400, height: int = 1600) -> Browser:
        to_browser_read, to_browser_write = os.pipe()
        from_browser_read, from_browser_write = os.pipe()

        def fds_3_and_4() -> None:  # the descriptors --remote-debugging-pipe reads and writes
            # Copies above 10 first, so that neither dup2 overwrites the other pipe's end.
            read_end, write_end = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_read, from_browser_write))
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            close_fds=False, preexec_fn=fds_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_read)
        os.close(from_browser_write)
        browser = cls(process, to_browser_write, from_browser_read)
        page = next(t for t in browser.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        browser._session = browser.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        browser.call("Page.enable")
        return browser

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.call("Browser.close", session=False)
        except (BrowserError, OSError):  # already gone: nothing left to close
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._commands)
        os.close(self._events)

    # ---- the protocol ----

    def call(self, method: str, session: bool = True, timeout_s: float = 60.0, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session and self._session:
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        reply = self._wait(lambda m: m.get("id") == self._next_id, timeout_s)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout_s: float = 60.0) -> dict:
        return self._wait(lambda m: m.get("method") == method, timeout_s)

    def _wait(self, wanted, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            for index, message in enumerate(self._pending):
                if wanted(message):
                    return self._pending.pop(index)
            if time.monotonic() > deadline:
                raise BrowserError(f"no answer from Chromium within {timeout_s:.0f} s")
            ready, _, _ = select.select([self._events], [], [], 0.5)
            if ready:
                chunk = os.read(self._events, 1 << 20)
                if not chunk:
                    raise BrowserError("Chromium closed its DevTools pipe")
                *messages, self._buffer = (self._buffer + chunk).split(b"\0")
                self._pending += [json.loads(m) for m in messages if m]

    # ---- what a test does ----

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed + released) at the centre of the element, scrolled into view."""
        x, y = self.evaluate(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            e.scrollIntoView({{block: "center"}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
