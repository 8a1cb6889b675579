"""Screenshots of a running ComfyUI frontend in headless Chromium (a manual check, not a test).

    python scripts/comfy_screenshots.py --url http://127.0.0.1:8188 --pack FOLDER --out DIR

Drives Chromium over the DevTools protocol (needs aiohttp, which ComfyUI's own environment has): opens the
app, the template browser on this pack's templates, then loads each shipped workflow. Writes PNGs to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Page:
    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=120)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    async def shot(self, path: Path) -> None:
        data = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))
        print(f"wrote {path}")


CLICK_TEXT = """(text) => {
  const hits = [...document.querySelectorAll('button, a, li, span, div, p')]
    .filter(e => e.offsetParent !== null && e.textContent.trim() === text);
  hits.sort((a, b) => a.children.length - b.children.length);
  if (!hits.length) return false;
  hits[0].click();
  return true;
}"""


async def drive(url: str, pack: str, out: Path, debug_port: int) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(60):
            try:
                async with session.get(f"http://127.0.0.1:{debug_port}/json") as response:
                    targets = await response.json()
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1)
        async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            await page.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1,
                            mobile=False)
            await page.call("Page.navigate", url=url)
            for _ in range(90):
                await asyncio.sleep(1)
                if await page.js("!!(window.app && window.app.graph && window.app.extensionManager)"):
                    break
            await asyncio.sleep(5)
            await page.shot(out / "0_app.png")
            await page.js("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
            await asyncio.sleep(4)
            await page.shot(out / "1_templates_dialog.png")
            clicked = await page.js(f"({CLICK_TEXT})({json.dumps(pack)})")
            print(f"clicked the pack's entry: {clicked}")
            await asyncio.sleep(4)
            await page.shot(out / "2_templates_pack.png")
            await page.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape",
                            windowsVirtualKeyCode=27)
            await asyncio.sleep(1)
            for index, path in enumerate(sorted((ROOT / "workflows").glob("*.json")), start=3):
                workflow = path.read_text(encoding="utf-8")
                await page.js(f"app.loadGraphData({workflow}, true, true, {json.dumps(path.stem)})")
                await asyncio.sleep(4)
                await page.shot(out / f"{index}_{path.stem}.png")
                await page.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape",
                                windowsVirtualKeyCode=27)
                await asyncio.sleep(1)
                await page.shot(out / f"{index}_{path.stem}_after_escape.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--pack", required=True, help="the pack's custom_nodes folder name")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "--window-size=1600,1000",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)
            asyncio.run(drive(args.url, args.pack, args.out, port))
        finally:
            browser.terminate()
            browser.wait(timeout=30)


if __name__ == "__main__":
    main()
