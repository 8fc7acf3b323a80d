"""A minimal headless-Chromium driver for tests: start ``chromium --headless``, talk the Chrome DevTools
Protocol (CDP) over its websocket with ``websocket-client`` (test extra), collect console errors, evaluate
JavaScript, take screenshots. Only what the report test needs; no Selenium / chromedriver.

CDP reference: https://chromedevtools.github.io/devtools-protocol/ (Page, Runtime, Log domains).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable ($LLFC_CHROMIUM first), or None."""
    env = os.environ.get("LLFC_CHROMIUM")
    if env:
        return env
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium with one page; use as a context manager.

    Collected while it runs: ``errors`` (console.error calls, uncaught exceptions and browser log entries of
    level "error", e.g. failed resource loads), as strings.
    """

    def __init__(self, executable: str, width: int = 1280, height: int = 900, timeout: float = 20.0):
        import websocket  # websocket-client

        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="llfc-chromium-")
        self._proc = subprocess.Popen(
            [
                executable,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--remote-debugging-port=0",
                f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port = self._wait_port()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
                targets = json.load(r)
            page = next(t for t in targets if t.get("type") == "page")
            self._ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        except BaseException:
            self.close()
            raise
        self._id = 0
        self.errors: list[str] = []
        self._events: list[dict] = []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def _wait_port(self) -> int:
        path = Path(self._profile) / "DevToolsActivePort"
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self._proc.returncode} before it listened")
            if path.is_file() and path.read_text().strip():
                return int(path.read_text().split()[0])
            time.sleep(0.05)
        raise TimeoutError("chromium did not open its DevTools port")

    def _on_event(self, msg: dict) -> None:
        m, p = msg["method"], msg.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            self.errors.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            self.errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}".strip())
        self._events.append(msg)

    def send(self, method: str, **params) -> dict:
        """Send one CDP command and return its result (events arriving meanwhile are recorded)."""
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv())
            if "method" in msg:
                self._on_event(msg)
            elif msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method}: {msg['error']}")
                return msg.get("result", {})

    def wait_event(self, method: str) -> dict:
        """Block until the event ``method`` arrives (or has arrived since the last wait)."""
        end = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self._events):
                if ev["method"] == method:
                    del self._events[: i + 1]
                    return ev.get("params", {})
            if time.monotonic() > end:
                raise TimeoutError(f"no {method} within {self.timeout} s")
            self._on_event(json.loads(self._ws.recv()))

    def goto(self, url: str) -> None:
        """Navigate and wait for the load event (images decoded, since they are data: URIs)."""
        self._events.clear()
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def eval(self, expression: str):
        """Evaluate a JavaScript expression in the page; returns its JSON value."""
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JavaScript error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        """Write a PNG screenshot of the viewport (or of the whole page)."""
        params: dict = {"format": "png"}
        if full_page:
            m = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": m["width"], "height": m["height"], "scale": 1},
            )
        data = self.send("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            if getattr(self, "_ws", None) is not None:
                self._ws.close()
        finally:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
