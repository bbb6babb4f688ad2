# shipping.py
from pydantic import BaseModel

from framework import Service, handles, message_type, route
from framework.http import json_response


@message_type("shop.order.placed")
class OrderPlaced(BaseModel):
    order_id: str
    total_cents: int


@message_type("shop.shipment.scheduled")
class ShipmentScheduled(BaseModel):
    order_id: str


class Shipping(Service):
    name = "shipping"
    publishes = {"shipping": [ShipmentScheduled]}

    @handles("orders", concurrency=32)  # consumer group "shipping", ordered per key
    async def on_placed(self, event: OrderPlaced) -> None:
        await self.publish(
            "shipping", ShipmentScheduled(order_id=event.order_id), key=event.order_id
        )  # correlation, causation, trace carried along

    @route("GET", "/health/extra")
    async def extra(self, request):
        return json_response({"ok": True})
