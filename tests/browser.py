"""Headless Chromium for the tests that need a real browser (the report's pages), driven over the DevTools protocol.

`--remote-debugging-pipe`: Chromium reads protocol messages on fd 3 and writes its answers and events on fd 4, each
a JSON object followed by a NUL byte, so the tests need no websocket client and open no port. `chromium()` finds the
binary (Debian's `chromium` package; CHROMIUM may name another) or None; `.ci/run` installs it when missing.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

__all__ = ["Browser", "chromium"]

# Flags for a browser that runs as root in a container and asks nothing of the network or the disk outside its
# profile folder.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
)


def chromium() -> str | None:
    """The Chromium binary: $CHROMIUM, else `chromium` or `chromium-browser` on PATH; None when there is none."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium with one page (a tab), closed on exit.

    with Browser(tmp_path / "profile") as b:
        b.open(path)                # waits for the load event
        b.eval("document.title")    # a JS expression's value (promises awaited)
        b.screenshot(path)          # PNG of the viewport
    """

    def __init__(self, profile: Path, width: int = 1280, height: int = 900, timeout_s: float = 60.0):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        exe = chromium()
        if exe is None:
            raise FileNotFoundError("no chromium on PATH (apt-get install chromium)")
        # bash (dash takes single-digit fds only) puts our pipe ends at fds 3 and 4 and becomes Chromium.
        script = f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}'
        self.proc = subprocess.Popen(
            ["bash", "-c", script, exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(to_browser_r, from_browser_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.timeout_s, self._next_id, self._buf, self.events = timeout_s, 0, b"", []
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its handle
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass

    def _message(self, deadline: float) -> dict:
        """The next message from the browser (TimeoutError past `deadline`, RuntimeError when it exits)."""
        while b"\0" not in self._buf:
            if not select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError(f"chromium: no message in {self.timeout_s} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (code {self.proc.poll()})")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            reply = self._message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(f"{method}: no answer in {self.timeout_s} s")

    def call(self, method: str, params: dict | None = None) -> dict:
        """A protocol command on the page."""
        return self._call(method, params, self._session)

    def open(self, path: Path | str) -> None:
        """Navigate to a local file (or a file:// URL, #fragment and all) and wait for its load event."""
        url = path if isinstance(path, str) else path.resolve().as_uri()
        self.events.clear()
        if "loaderId" not in self.call("Page.navigate", {"url": url}):
            return  # a #fragment of the page already open: the browser scrolls, no document loads
        deadline = time.monotonic() + self.timeout_s
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._message(deadline))

    def eval(self, expression: str):
        """The value of a JS expression in the page (a promise is awaited; the value must be JSON)."""
        got = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in got:
            raise RuntimeError(f"{expression[:80]}...: {got['exceptionDetails']}")
        return got["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """The viewport as a PNG file."""
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"]))
        return path
