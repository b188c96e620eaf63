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
