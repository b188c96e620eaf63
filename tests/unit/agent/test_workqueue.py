"""The work queue never runs one key twice at once, and coalesces re-adds."""

import asyncio

from libvirt_operator.agent.workqueue import WorkQueue


def test_one_key_runs_serially_and_readds_coalesce():
    async def scenario():
        running, peak, calls = 0, 0, []

        async def handler(key):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            calls.append(key)
            await asyncio.sleep(0.05)
            running -= 1
            return None

        q = WorkQueue(handler, workers=4)
        q.start()
        q.add("a")
        await asyncio.sleep(0.01)
        for _ in range(5):  # while "a" is busy: coalesce into one more run
            q.add("a")
        q.add("b")
        await asyncio.sleep(0.3)
        await q.stop()
        return peak, calls

    peak, calls = asyncio.run(scenario())
    assert calls.count("a") == 2
    assert calls.count("b") == 1
    assert peak <= 2  # "a" and "b" may overlap, "a" never with itself


def test_requeue_after_delay():
    async def scenario():
        calls = []

        async def handler(key):
            calls.append(asyncio.get_running_loop().time())
            return 0.1 if len(calls) == 1 else None

        q = WorkQueue(handler, workers=1)
        q.start()
        q.add("k")
        await asyncio.sleep(0.3)
        await q.stop()
        return calls

    calls = asyncio.run(scenario())
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.09


def test_background_lane_waits_for_event_driven_keys_and_runs_within_its_share():
    async def scenario():
        running_bg, peak_bg, order = 0, 0, []

        async def handler(key):
            nonlocal running_bg, peak_bg
            order.append(key)
            background = key.startswith("bg") and key != "bg4"  # bg4 is promoted to the front lane
            if background:
                running_bg += 1
                peak_bg = max(peak_bg, running_bg)
            await asyncio.sleep(0.05)
            if background:
                running_bg -= 1
            return None

        q = WorkQueue(handler, workers=4, background_workers=2)
        q.add("ev0")  # before start: all four wait in the queue
        q.add("ev1")
        for i in range(6):
            q.add_background(f"bg{i}")
        q.add("ev2")
        q.add_background("bg5")  # already waiting: once
        q.add("bg4")  # an event for a key in the background lane: it moves to the front
        assert q.depth == 9  # ev0..ev2 and bg4 in front, bg0..bg3 and bg5 behind
        q.start()
        await asyncio.sleep(0.6)
        await q.stop()
        return peak_bg, order

    peak_bg, order = asyncio.run(scenario())
    assert sorted(order) == sorted(["ev0", "ev1", "ev2", "bg0", "bg1", "bg2", "bg3", "bg4", "bg5"])
    assert peak_bg <= 2
    assert order.index("ev2") < order.index("bg2")  # event-driven work first
    assert order.index("bg4") < order.index("bg2")  # promoted


def test_background_add_of_a_busy_key_is_dropped_and_queued_for_is_known_to_the_handler():
    from libvirt_operator.agent.workqueue import queued_for

    async def scenario():
        calls, waits = [], []

        async def handler(key):
            calls.append(key)
            waits.append(queued_for())
            await asyncio.sleep(0.1)
            return None

        q = WorkQueue(handler, workers=1)
        q.add("a")
        q.add("b")
        q.start()
        await asyncio.sleep(0.02)
        q.add_background("a")  # busy: the pass under way is as fresh as a resync
        await asyncio.sleep(0.4)
        await q.stop()
        return calls, waits

    calls, waits = asyncio.run(scenario())
    assert calls == ["a", "b"]
    assert waits[1] >= 0.09  # b waited for a's pass
