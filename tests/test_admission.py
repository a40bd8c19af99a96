"""Admission: bounded queue, switches wait for generations, one request per conversation."""

from __future__ import annotations

import asyncio

import pytest

from ailab.upstream.admission import GenerationGate, KeyedLocks, Overloaded, SwitchTimeout


def test_requests_past_the_capacity_are_refused_at_once() -> None:
    async def scenario() -> None:
        gate = GenerationGate(capacity=2, switch_wait_s=1)
        async with gate.generation(), gate.generation():
            with pytest.raises(Overloaded):
                async with gate.generation():
                    pass
        async with gate.generation():
            assert gate.active == 1

    asyncio.run(scenario())


def test_a_switch_waits_for_running_generations_and_holds_new_ones() -> None:
    order: list[str] = []

    async def scenario() -> None:
        gate = GenerationGate(capacity=10, switch_wait_s=5)

        async def generation(name: str, hold: float) -> None:
            async with gate.generation():
                order.append(f"{name} start")
                await asyncio.sleep(hold)
                order.append(f"{name} end")

        async def switch() -> None:
            async with gate.exclusive():
                order.append("switch")
                await asyncio.sleep(0.05)

        first = asyncio.create_task(generation("a", 0.1))
        await asyncio.sleep(0.01)
        switching = asyncio.create_task(switch())
        await asyncio.sleep(0.01)
        late = asyncio.create_task(generation("b", 0))
        await asyncio.gather(first, switching, late)

    asyncio.run(scenario())
    assert order == ["a start", "a end", "switch", "b start", "b end"]


def test_a_request_gives_up_when_a_switch_outlasts_its_wait() -> None:
    async def scenario() -> None:
        gate = GenerationGate(capacity=10, switch_wait_s=0.05)
        async with gate.exclusive():
            with pytest.raises(SwitchTimeout):
                async with gate.generation():
                    pass

    asyncio.run(scenario())


def test_two_requests_on_one_conversation_run_one_after_the_other() -> None:
    events: list[str] = []

    async def scenario() -> None:
        locks = KeyedLocks()

        async def turn(key: str, name: str) -> None:
            async with locks.hold(key):
                events.append(f"{name}+")
                await asyncio.sleep(0.02)
                events.append(f"{name}-")

        await asyncio.gather(turn("c", "1"), turn("c", "2"), turn("other", "3"))
        assert locks._locks == {}

    asyncio.run(scenario())
    assert events.index("1-") < events.index("2+")
    assert events.index("3+") < events.index("1-")
