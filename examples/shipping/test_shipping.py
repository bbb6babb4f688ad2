# test_shipping.py
from shipping import OrderPlaced, ShipmentScheduled, Shipping


async def test_a_placed_order_is_scheduled_for_shipping(msa_harness):
    async with msa_harness(Shipping) as harness:
        placed = OrderPlaced(order_id="o-1", total_cents=1290)
        await harness.publish("orders", placed, key="o-1")

        [handled] = await harness.handled(OrderPlaced)
        assert handled.error is None
        harness.mock(Shipping.on_placed).assert_called_once_with(placed)
        [scheduled] = await harness.wait_published(ShipmentScheduled)
        assert scheduled.data.order_id == "o-1"
        assert scheduled.correlationid == handled.message.envelope.correlationid
