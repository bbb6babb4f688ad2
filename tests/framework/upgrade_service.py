"""The service the rolling-upgrade test replaces under load (run as `msa run` processes).

GET /work answers after a few milliseconds with the replica's id; every `upgrade.item` event on
UPGRADE_IN is handled and answered with an `upgrade.done` event on UPGRADE_OUT.
"""

from __future__ import annotations

import asyncio
import os
from typing import ClassVar

from aiohttp import web
from pydantic import BaseModel

from framework.http import json_response
from framework.messages import message_type
from framework.service import Service, handles, route

IN = os.environ.get("UPGRADE_IN", "upgrade.in")
OUT = os.environ.get("UPGRADE_OUT", "upgrade.out")


@message_type("upgrade.item")
class Item(BaseModel):
    n: int


@message_type("upgrade.done")
class Done(BaseModel):
    n: int
    replica: str


class Worker(Service):
    name = "upgrade-worker"
    publishes: ClassVar[dict[str, list[type]]] = {OUT: [Done]}

    @handles(IN, concurrency=8)
    async def on_item(self, item: Item) -> None:
        await asyncio.sleep(0.005)
        await self.publish(OUT, Done(n=item.n, replica=os.environ["REPLICA"]), key=str(item.n))

    @route("GET", "/work")
    async def work(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)
        return json_response({"replica": os.environ["REPLICA"]})
