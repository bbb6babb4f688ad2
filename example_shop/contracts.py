"""The shop's published language: topics, commands, events and replies, shared by its services.

Each service owns its data and talks to the others only through these messages (and through the
gateway's HTTP routes). Commands go to the owning service's `*.commands` topic and are answered
on its `*.events` topic (the saga correlates them); domain events go to `*.events` topics.
Keys: everything about one order is keyed by its order id, so it stays in order; everything
about one product (catalog and stock events) by its product id.

Prices and stock are the servers': the catalog announces every product it holds (the demo
products at seeding too) with its price, inventory every change of a product's available stock,
and orders keeps both as read models (see `example_shop.orders.service`). A client never says
what something costs.

    orders    --ReserveStock-->        inventory  --StockReserved / StockRejected-->      orders
    orders    --AuthorizePayment-->    payments   --PaymentAuthorized / PaymentDeclined--> orders
    orders    --CreateShipment-->      shipping   --ShipmentCreated-->                    orders
    orders    --ReleaseStock / RefundPayment / CancelShipment-->  (compensations)
    orders    --CommitStock-->         inventory  (the confirmed order's reservation is sold)
    orders    --OrderPlaced / OrderConfirmed / OrderCancelled--> shop.orders.events (SSE, analytics)
    catalog   --ProductCreated / ProductPriceChanged / ProductRenamed--> shop.catalog.events
    inventory --StockLevelChanged--> shop.inventory.stock
    shipping  --ShipmentTracked--> shop.shipping.events
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from framework.messages import message_type

__all__ = [
    "TOPICS",
    "AuthorizePayment",
    "CancelShipment",
    "CommitStock",
    "CreateShipment",
    "OrderCancelled",
    "OrderConfirmed",
    "OrderLine",
    "OrderPlaced",
    "PaymentAuthorized",
    "PaymentDeclined",
    "PaymentRefunded",
    "ProductCreated",
    "ProductPriceChanged",
    "ProductRenamed",
    "RefundPayment",
    "ReleaseStock",
    "ReserveStock",
    "ShipmentCancelled",
    "ShipmentCreated",
    "ShipmentTracked",
    "StockLevelChanged",
    "StockRejected",
    "StockReleased",
    "StockReserved",
]


class TOPICS:
    """Topic names, one place."""

    CATALOG_EVENTS = "shop.catalog.events"
    INVENTORY_COMMANDS = "shop.inventory.commands"
    INVENTORY_EVENTS = "shop.inventory.events"
    STOCK_EVENTS = "shop.inventory.stock"
    PAYMENTS_COMMANDS = "shop.payments.commands"
    PAYMENTS_EVENTS = "shop.payments.events"
    SHIPPING_COMMANDS = "shop.shipping.commands"
    SHIPPING_EVENTS = "shop.shipping.events"
    ORDERS_EVENTS = "shop.orders.events"


class OrderLine(BaseModel):
    """A line of an order, priced by the orders service from the catalog's prices. `name` is
    the product's name when the order was placed (None when the orders service did not know
    it, or in an event from before lines were named)."""

    product_id: str
    quantity: int = Field(gt=0, le=100)
    unit_price_cents: int = Field(ge=0)
    name: str | None = None


# -- catalog --------------------------------------------------------------------------------------


@message_type("shop.catalog.product_created")
class ProductCreated(BaseModel):
    """A product the catalog holds now, with its price: published when it is created, the demo
    products' when the catalog seeds them."""

    product_id: str
    name: str
    category: str
    price_cents: int


@message_type("shop.catalog.price_changed")
class ProductPriceChanged(BaseModel):
    """A product's new price, with its name (None in events from before they carried it)."""

    product_id: str
    old_price_cents: int
    new_price_cents: int
    name: str | None = None


@message_type("shop.catalog.renamed")
class ProductRenamed(BaseModel):
    """A product's new name; its price did not change, and is carried for readers that learn
    of the product from this event alone (the topic is compacted)."""

    product_id: str
    name: str
    price_cents: int


# -- inventory ------------------------------------------------------------------------------------


@message_type("shop.inventory.reserve")
class ReserveStock(BaseModel):
    order_id: str
    lines: list[OrderLine]


@message_type("shop.inventory.release")
class ReleaseStock(BaseModel):
    order_id: str


@message_type("shop.inventory.commit")
class CommitStock(BaseModel):
    """The order is confirmed: its reserved units are sold (on hand and reserved both drop).
    Fire-and-forget; a second commit, or one for an order holding nothing, changes nothing."""

    order_id: str


@message_type("shop.inventory.reserved")
class StockReserved(BaseModel):
    order_id: str


@message_type("shop.inventory.rejected")
class StockRejected(BaseModel):
    order_id: str
    reason: str


@message_type("shop.inventory.released")
class StockReleased(BaseModel):
    order_id: str


@message_type("shop.inventory.stock_level")
class StockLevelChanged(BaseModel):
    """How many units of a product can be ordered now, on `TOPICS.STOCK_EVENTS` keyed by product.
    `version` grows with every change of the product's stock row: a reader keeps the highest
    it saw, so an older level (redelivered, or announced again at a start) never wins."""

    product_id: str
    available: int
    version: int


# -- payments -------------------------------------------------------------------------------------


@message_type("shop.payments.authorize")
class AuthorizePayment(BaseModel):
    order_id: str
    amount_cents: int = Field(gt=0)
    card_number: str


@message_type("shop.payments.refund")
class RefundPayment(BaseModel):
    order_id: str


@message_type("shop.payments.authorized")
class PaymentAuthorized(BaseModel):
    order_id: str
    payment_id: str
    amount_cents: int


@message_type("shop.payments.declined")
class PaymentDeclined(BaseModel):
    order_id: str
    reason: str


@message_type("shop.payments.refunded")
class PaymentRefunded(BaseModel):
    order_id: str
    payment_id: str | None = None


# -- shipping -------------------------------------------------------------------------------------


@message_type("shop.shipping.create")
class CreateShipment(BaseModel):
    order_id: str
    address: str
    lines: list[OrderLine]


@message_type("shop.shipping.cancel")
class CancelShipment(BaseModel):
    order_id: str


@message_type("shop.shipping.created")
class ShipmentCreated(BaseModel):
    order_id: str
    shipment_id: str


@message_type("shop.shipping.cancelled")
class ShipmentCancelled(BaseModel):
    order_id: str


@message_type("shop.shipping.tracked")
class ShipmentTracked(BaseModel):
    order_id: str
    shipment_id: str
    status: str


# -- orders ---------------------------------------------------------------------------------------


@message_type("shop.orders.placed")
class OrderPlaced(BaseModel):
    order_id: str
    customer_id: str
    lines: list[OrderLine]
    total_cents: int


@message_type("shop.orders.confirmed")
class OrderConfirmed(BaseModel):
    order_id: str
    customer_id: str
    lines: list[OrderLine]
    total_cents: int


@message_type("shop.orders.cancelled")
class OrderCancelled(BaseModel):
    order_id: str
    customer_id: str
    reason: str
