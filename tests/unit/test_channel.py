"""The control channel's requests over a real socketpair: replies find their
requests whatever their order, a reply nobody asked for is an error, and
EOF fails the requests still waiting."""

from __future__ import annotations

import functools
import socket
from collections.abc import Awaitable, Callable

import pytest
import trio

from shardproxy.control.channel import Channel, ChannelClosed, request_all
from shardproxy.control.messages import Ack, Drained, Health, Reply, Request, encode


def in_trio(test: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        trio.run(test)

    return run


def channel_pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return (
        Channel(trio.socket.from_stdlib_socket(a)),
        Channel(trio.socket.from_stdlib_socket(b)),
    )


async def read_forever(channel: Channel) -> None:
    """The one reader of a channel, as the supervisor's loop is."""
    while await channel.receive() is not None:
        pass


def drained(n: int) -> Drained:
    return Drained((("pool", f"s{n}"),))


@in_trio
async def test_concurrent_requests_get_their_own_replies_in_any_order() -> None:
    ours, theirs = channel_pair()
    replies: dict[int, object] = {}
    all_replied = trio.Event()

    async def ask(n: int) -> None:
        replies[n] = await ours.request(drained(n))
        if len(replies) == 5:
            all_replied.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_forever, ours)
        for n in range(5):
            nursery.start_soon(ask, n)
        requests = []
        for _ in range(5):
            request = await theirs.receive()
            assert isinstance(request, Request)
            requests.append(request)
        assert len({r.id for r in requests}) == 5
        for request in reversed(requests):  # answered last first
            assert isinstance(request.message, Drained)
            (_, server), *_ = request.message.servers
            await theirs.reply(request, Health((server,)))
        with trio.fail_after(5):
            await all_replied.wait()
        nursery.cancel_scope.cancel()
    assert replies == {n: Health((f"s{n}",)) for n in range(5)}


@in_trio
async def test_plain_messages_still_reach_the_reader_between_replies() -> None:
    ours, theirs = channel_pair()
    got: list[object] = []

    async def reader() -> None:
        while (message := await ours.receive()) is not None:
            got.append(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        with trio.fail_after(5):
            async with trio.open_nursery() as asking:
                asking.start_soon(ours.request, drained(1))
                request = await theirs.receive()
                assert isinstance(request, Request)
                await theirs.send(Health(("a:1",)))
                await theirs.reply(request, Ack())
        theirs.close()
    assert got == [Health(("a:1",))]


@in_trio
async def test_eof_fails_the_waiting_requests_and_later_ones() -> None:
    ours, theirs = channel_pair()
    failures: list[str] = []

    async def ask(n: int) -> None:
        with pytest.raises(ChannelClosed):
            await ours.request(drained(n))
        failures.append(f"s{n}")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_forever, ours)
            for n in range(3):
                nursery.start_soon(ask, n)
            for _ in range(3):
                assert isinstance(await theirs.receive(), Request)
            theirs.close()
    assert sorted(failures) == ["s0", "s1", "s2"]
    with pytest.raises(ChannelClosed):
        await ours.request(drained(9))


@in_trio
async def test_a_reply_to_no_request_is_an_error() -> None:
    ours, theirs = channel_pair()
    await theirs._send(Reply(41, Ack()))  # as a confused peer would
    with pytest.raises(ValueError, match="request 41"):
        await ours.receive()


@in_trio
async def test_a_late_reply_to_a_request_that_gave_up_is_dropped() -> None:
    ours, theirs = channel_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_forever, ours)
        async with trio.open_nursery() as giving_up:
            giving_up.start_soon(ours.request, drained(1))
            late = await theirs.receive()
            giving_up.cancel_scope.cancel()  # as a timeout would
        assert isinstance(late, Request)
        await theirs.reply(late, Ack())  # after the requester gave up
        answer = trio.Event()

        async def ask_again() -> None:
            assert await ours.request(drained(2)) == Ack()
            answer.set()

        nursery.start_soon(ask_again)
        again = await theirs.receive()
        assert isinstance(again, Request) and again.id != late.id
        await theirs.reply(again, Ack())
        with trio.fail_after(5):
            await answer.wait()
        nursery.cancel_scope.cancel()


@in_trio
async def test_request_all_names_who_did_not_answer() -> None:
    fast, fast_peer = channel_pair()
    silent, silent_peer = channel_pair()
    gone, gone_peer = channel_pair()
    gone_peer.close()

    async def answer(channel: Channel) -> None:
        request = await channel.receive()
        assert isinstance(request, Request)
        await channel.reply(request, Ack())

    async with trio.open_nursery() as nursery:
        for channel in (fast, silent, gone):
            nursery.start_soon(read_forever, channel)
        nursery.start_soon(answer, fast_peer)
        channels = {"0": fast, "1": silent, "2": gone}
        answers, unanswered = await request_all(channels, drained(1), timeout=0.2)
        nursery.cancel_scope.cancel()
    assert answers == {"0": Ack()}
    assert unanswered == ["1"]
    assert isinstance(await silent_peer.receive(), Request)  # it was asked
    assert encode(Ack()) == b'{"type":"ack"}\n'


@in_trio
async def test_a_broken_line_fails_the_waiting_requests() -> None:
    ours, theirs = channel_pair()
    failed = trio.Event()

    async def ask() -> None:
        with pytest.raises(ChannelClosed):
            await ours.request(drained(1))
        failed.set()

    async def reader() -> None:
        with pytest.raises(ValueError):
            await ours.receive()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            assert isinstance(await theirs.receive(), Request)
            nursery.start_soon(reader)
            await theirs._sock.send(b"not json\n")
            await failed.wait()
    with pytest.raises(ChannelClosed):
        await ours.request(drained(2))
