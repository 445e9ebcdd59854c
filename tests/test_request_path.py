"""The request path's loop turns: what a cheap model's answer costs between the model and the client."""

from __future__ import annotations

import asyncio

from pagedserve.responder import Delivery, LoopMailbox


def test_a_post_from_a_plain_loop_callback_is_delivered_at_once() -> None:
    """A batch run by a loop callback (``execute_on_loop``) hands its answers over without a turn."""
    seen: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        mailbox = LoopMailbox(loop)

        def batch() -> None:
            mailbox.post(lambda _: seen.append("delivered"), Delivery(None, None, True))
            seen.append("after post")

        loop.call_soon(batch)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert seen == ["delivered", "after post"]


def test_a_post_behind_queued_ones_keeps_their_order() -> None:
    seen: list[int] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        mailbox = LoopMailbox(loop)
        mailbox.post(lambda _: seen.append(1), Delivery(None, None, False))  # from the task: queued
        loop.call_soon(mailbox.post, lambda _: seen.append(2), Delivery(None, None, True))
        for _ in range(3):
            await asyncio.sleep(0)

    asyncio.run(scenario())
    assert seen == [1, 2]


def test_an_early_post_from_the_starting_task_is_delivered_at_once() -> None:
    """A front-end whose ``deliver`` only queues (HTTP's inbox) takes an answer made inside its own
    start_request call without a loop turn; other front-ends' answers wait for the next turn."""
    seen: list[str] = []

    async def scenario() -> None:
        mailbox = LoopMailbox(asyncio.get_running_loop())
        mailbox.post(lambda _: seen.append("early"), Delivery(None, None, True), early=True)
        mailbox.post(lambda _: seen.append("late"), Delivery(None, None, True))
        seen.append("task goes on")
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert seen == ["early", "task goes on", "late"]
