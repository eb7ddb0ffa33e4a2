"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol, with aiohttp's websocket client:
load a page, collect what a person would see go wrong (console errors, uncaught exceptions, failed loads),
evaluate expressions in it, and take a full-page screenshot."""

from __future__ import annotations

import asyncio
import base64
import itertools
import pathlib
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@dataclass
class Page:
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed requests
    values: dict[str, Any] = field(default_factory=dict)  # the evaluated expressions' results
    screenshot: bytes = b""  # PNG of the whole page


class _DevTools:
    def __init__(self, socket):
        self.socket, self.ids = socket, itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}
        self.events: list[dict] = []
        self.loaded = asyncio.Event()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.socket:
            data = message.json()
            if "id" in data:
                self.waiting.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)
                if data["method"] == "Page.loadEventFired":
                    self.loaded.set()

    async def call(self, method: str, **params: Any) -> dict:
        call_id = next(self.ids)
        self.waiting[call_id] = asyncio.get_running_loop().create_future()
        await self.socket.send_json({"id": call_id, "method": method, "params": params})
        reply = await asyncio.wait_for(self.waiting[call_id], 60)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]

    def errors(self) -> list[str]:
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(f"exception: {details.get('exception', {}).get('description') or details['text']}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(f"console.{params['type']}: " + " ".join(str(a.get("value", a.get("description")))
                                                                      for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}".strip())
        return found


async def _open(url: str, expressions: dict[str, str], width: int, port: int) -> Page:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
            target = next(t for t in await response.json() if t["type"] == "page")
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as socket:
            tools = _DevTools(socket)
            for domain in ("Runtime", "Log", "Page"):
                await tools.call(f"{domain}.enable")
            await tools.call("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1,
                             mobile=False)
            await tools.call("Page.navigate", url=url)
            await asyncio.wait_for(tools.loaded.wait(), 60)
            page = Page()
            for name, expression in expressions.items():
                result = await tools.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                          awaitPromise=True)
                assert "exceptionDetails" not in result, f"{name}: {result['exceptionDetails']}"
                page.values[name] = result["result"].get("value")
            size = (await tools.call("Page.getLayoutMetrics"))["cssContentSize"]
            shot = await tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                    clip={"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1})
            page.screenshot = base64.b64decode(shot["data"])
            await asyncio.sleep(0.2)  # let late console messages arrive
            page.errors = tools.errors()
            tools.reader.cancel()
            return page


def open_page(url: str, expressions: dict[str, str] | None = None, width: int = 1280) -> Page:
    """Load ``url`` in a fresh headless Chromium, evaluate ``expressions`` (name -> JS) once it has loaded."""
    assert CHROMIUM, "chromium is not installed (apt-get install chromium)"
    profile = pathlib.Path(tempfile.mkdtemp(prefix="chromium-"))
    browser = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"  # Chromium writes the port it chose here
        deadline = time.monotonic() + 60
        while not active.exists() or not active.read_text().strip():
            assert browser.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.05)
        port = int(active.read_text().split()[0])
        return asyncio.run(_open(url, expressions or {}, width, port))
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
