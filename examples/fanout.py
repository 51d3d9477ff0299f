"""Fan-out/fan-in with delayed sends: ``fanout`` spawns N ``square`` children; each child sends
itself a message ``delay_ms`` later and, on that wake, finishes with ``x*x``; when every child has
finished, the parent replies with the sum.

    entities run examples/fanout.py:registry /fanout/f1 '{"n": 5, "delay_ms": 200}' --json

prints ``55``. Everything (children, the timers, the partial results) is durable: kill the
process at any point and run the same command again to finish the job.
"""

from __future__ import annotations

from pydantic import BaseModel

from entities import HandlerContext, Registry, WakeEvent, collection


class Job(BaseModel):
    n: int
    delay_ms: int = 0


class Square(BaseModel):
    x: int
    delay_ms: int = 0


class Result(BaseModel):
    key: str  # the child's URL
    value: int


class Pending(BaseModel):
    key: str  # the job's message key (what the reply answers)
    n: int
    done: bool = False


registry = Registry()


@registry.define("square", description="Finishes with x*x after a delay", args_schema=Square)
async def square(ctx: HandlerContext, wake: WakeEvent) -> None:
    if any(m.payload.get("tick") for m in wake.messages):
        ctx.reply(ctx.args["x"] * ctx.args["x"])
    elif ctx.first_wake:
        await ctx.send(ctx.entity_url, {"tick": True}, after_ms=ctx.args["delay_ms"])


@registry.define(
    "fanout",
    description="Sums the squares of 1..n computed by n children",
    state={"results": collection(Result), "jobs": collection(Pending)},
    inbox=Job,
)
async def fanout(ctx: HandlerContext, wake: WakeEvent) -> None:
    for message in wake.messages:
        job = message.payload
        ctx.state.jobs.insert(Pending(key=message.key, n=job["n"]))
        for i in range(1, job["n"] + 1):
            await ctx.spawn(
                "square", f"{ctx.entity_id}-{i}", args={"x": i, "delay_ms": job["delay_ms"]}
            )
    for event in wake.wakes:
        child = event.get("finished_child")
        if child and child["run_status"] == "completed" and child["response"] is not None:
            ctx.state.results.upsert(Result(key=child["url"], value=child["response"]))
    for job in ctx.state.jobs.to_list():
        if not job.done and len(ctx.state.results) >= job.n:
            ctx.reply(sum(r.value for r in ctx.state.results), to=job.key)
            ctx.state.jobs.update(job.key, Pending(key=job.key, n=job.n, done=True))
