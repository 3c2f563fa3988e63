"""What forwarding costs the forwarding node itself, in CPU, per GET.

    python benchmarks/forward_cost.py      # a few seconds

Drives one node's router in-process, with the owner's reply already waiting
on a socket pair when the request is forwarded, so nothing waits on another
process and the figure is the node's own work: decoding, routing, the peer
link's write and read, the reply. Prints the median time per GET served
locally and per GET forwarded, and the difference. Run it under
``valgrind --tool=callgrind`` for instruction counts that do not drift with
the machine.
"""

from __future__ import annotations

import socket
import statistics
import sys
import time

import trio

from dcache import codec, protocol, transport, wsframe
from dcache.mux import Channel
from dcache.peers import PeerLinks, _Link
from dcache.protocol import ServerSession
from dcache.router import Router
from dcache.shard import ShardMap
from dcache.store import Store

VALUE = b"v" * 100


async def no_members() -> dict:
    return {}


async def main(rounds: int) -> None:
    shard_map = ShardMap.build(1, ["here", "there"])
    keys = (f"k{i}".encode() for i in range(10_000))
    owned = {shard_map.owner("", k): k for k in keys}
    ours, owner_end = socket.socketpair()
    owner_end.setblocking(False)
    proto = protocol.ClientConnection(max_message=1 << 20, mask_key=wsframe.NULL_MASK, upgraded=True)
    conn = transport.Connection(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), proto)
    channel = Channel(conn, name="there", timeout=5.0, watched=True)
    links = PeerLinks(node_id="here")
    links._links["there"] = _Link("there", channel=channel, up=trio.Event(), queue=trio.lowlevel.ParkingLot())
    store = Store(clock=time.monotonic)
    store.set("", owned["here"], VALUE, 0)
    router = Router(store=store, node_id="here", limits=codec.Limits(), shard_map=shard_map,
                    stats=dict, members=no_members, server_name="bench", peers=links)  # fmt: skip
    session = ServerSession(greeted=True)
    local = codec.encode_frame([[5, "get", {"key": owned["here"]}]])
    remote = codec.encode_frame([[5, "get", {"key": owned["there"]}]])

    def answer_next() -> None:  # the owner's reply to the request about to be sent
        reply = codec.encode_frame([[proto._next_rid, codec.Status.OK, VALUE]])
        owner_end.send(wsframe.build_frame(reply, masked=False))

    def drain() -> None:  # the owner's end swallows the request
        try:
            while owner_end.recv(1 << 16):
                pass
        except BlockingIOError:
            pass

    samples: dict[str, list[float]] = {"local": [], "forwarded": [], "owner's part (not the node's)": []}
    clock = time.perf_counter
    for _ in range(rounds):
        for _ in range(1000):
            started = clock()
            await router.handle(session, [local])
            samples["local"].append(clock() - started)
        for _ in range(1000):
            started = clock()
            answer_next()
            await router.handle(session, [remote])
            drain()
            samples["forwarded"].append(clock() - started)
            started = clock()
            answer_next()
            ours.recv(1 << 16)
            drain()
            samples["owner's part (not the node's)"].append(clock() - started)
    p50 = {name: statistics.median(s) * 1e6 for name, s in samples.items()}
    for name, us in p50.items():
        print(f"{name:32} {us:7.1f} µs")
    forward = p50["forwarded"] - p50["owner's part (not the node's)"]
    print(f"{'forwarding, the node alone':32} {forward:7.1f} µs  ({forward - p50['local']:+.1f} µs over a local GET)")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 20)
