"""A benchmark client process: sequential calls on one connection, or closed loops on many.

``python client_worker.py SPEC_JSON`` prints one JSON line with the result. The spec says the bus
address, the call (destination, path, interface, member, signature, body) and the mode:

* ``latency``: ``warmup`` calls, then ``count`` calls one after the other; the reply carries
  every call's round trip in seconds.
* ``throughput``: ``connections`` connections each calling in a closed loop (the next call as
  soon as the reply is in) from wall-clock ``start_at`` for ``seconds``; the reply carries the
  number of calls completed in that window.
"""

import asyncio
import json
import sys
import time
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus


def _message(call: dict[str, Any]) -> Message:
    return Message(
        destination=call["destination"],
        path=call["path"],
        interface=call["interface"],
        member=call["member"],
        signature=call["signature"],
        body=call["body"],
    )


async def _call(bus: MessageBus, call: dict[str, Any]) -> None:
    reply = await bus.call(_message(call))
    if reply is None or reply.message_type is MessageType.ERROR:
        raise RuntimeError(f"call failed: {reply.body if reply else 'no reply'}")


async def latency(spec: dict[str, Any]) -> dict[str, Any]:
    """Round trips of sequential calls on one connection."""
    bus = await MessageBus(bus_address=spec["address"]).connect()
    call = spec["call"]
    for _ in range(spec["warmup"]):
        await _call(bus, call)
    samples = []
    clock = time.perf_counter
    for _ in range(spec["count"]):
        began = clock()
        await _call(bus, call)
        samples.append(clock() - began)
    bus.disconnect()
    return {"samples": samples}


async def throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """Calls completed by closed-loop clients within a common time window."""
    call = spec["call"]
    buses = [
        await MessageBus(bus_address=spec["address"]).connect() for _ in range(spec["connections"])
    ]
    start_at, end_at = spec["start_at"], spec["start_at"] + spec["seconds"]
    counts = [0] * len(buses)

    async def loop(index: int, bus: MessageBus) -> None:
        while time.time() < start_at:  # warm up until the window opens
            await _call(bus, call)
        while time.time() < end_at:
            await _call(bus, call)
            counts[index] += 1

    await asyncio.gather(*(loop(i, bus) for i, bus in enumerate(buses)))
    for bus in buses:
        bus.disconnect()
    return {"calls": sum(counts), "seconds": spec["seconds"]}


def main() -> None:
    spec = json.loads(sys.argv[1])
    run = latency if spec["mode"] == "latency" else throughput
    result = asyncio.run(run(spec))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
