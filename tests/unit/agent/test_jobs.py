"""JobRunner: one job per VM, and a job's work waits for the VM's reconcile passes under way."""

import asyncio

from libvirt_operator.agent.jobs import JobRunner, Running

RUN = Running("SnapshotInProgress", "snapshot default/s1")


def test_a_job_started_during_a_pass_runs_only_after_the_pass_ends():
    async def scenario():
        order, done = [], []
        runner = JobRunner(on_done=done.append)

        async def work():
            order.append("job")

        with runner.pass_of("vm-1"):
            assert runner.start("vm-1", RUN, work)
            assert runner.busy("vm-1") == RUN  # the pass sees the job at once
            for _ in range(5):
                await asyncio.sleep(0)
            order.append("pass ends")
        for _ in range(5):
            await asyncio.sleep(0)
        return order, done, runner.busy("vm-1")

    order, done, busy = asyncio.run(scenario())
    assert order == ["pass ends", "job"]
    assert done == ["vm-1"] and busy is None


def test_overlapping_passes_hold_the_job_until_the_last_ends_and_other_vms_are_not_held():
    async def scenario():
        order = []
        runner = JobRunner(on_done=lambda uid: None)

        def work(name):
            async def run():
                order.append(name)
            return run

        with runner.pass_of("vm-1"):
            with runner.pass_of("vm-1"):
                runner.start("vm-1", RUN, work("job vm-1"))
                runner.start("vm-2", RUN, work("job vm-2"))
                for _ in range(5):
                    await asyncio.sleep(0)
                order.append("inner pass ends")
            for _ in range(5):
                await asyncio.sleep(0)
            order.append("outer pass ends")
        for _ in range(5):
            await asyncio.sleep(0)
        return order

    assert asyncio.run(scenario()) == ["job vm-2", "inner pass ends", "outer pass ends", "job vm-1"]


def test_a_second_job_for_a_held_vm_is_refused():
    async def scenario():
        runner = JobRunner(on_done=lambda uid: None)
        gate = asyncio.Event()
        assert runner.start("vm-1", RUN, gate.wait)
        refused = not runner.start("vm-1", RUN, gate.wait)
        gate.set()
        await asyncio.sleep(0.01)
        return refused, runner.busy("vm-1")

    assert asyncio.run(scenario()) == (True, None)
