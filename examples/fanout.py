"""Fan-out/fan-in with delayed sends: ``fanout`` spawns N ``square`` children; each child sends
itself a message ``delay_ms`` later and, on that wake, finishes with ``x*x``; when every child has
finished, the parent replies with the sum.

    entities run examples/fanout.py:registry /fanout/f1 '{"n": 5, "delay_ms": 200}' --json

prints ``55``. Everything (children, the timers, the partial results) is durable: kill the
process at any point and run the same command again to finish the job. Each job has its own
children (``{fanout id}-{job}-{i}``), so a second job on the same entity gets its own answer; if
a child's id is taken by an entity this one did not create, the job answers with an error.
"""

from __future__ import annotations

from pydantic import BaseModel

from entities import DuplicateEntity, HandlerContext, Registry, WakeEvent, collection


class Job(BaseModel):
    n: int
    delay_ms: int = 0


class Square(BaseModel):
    x: int
    delay_ms: int = 0


class Result(BaseModel):
    key: str  # the child's URL
    job: str  # the job's message key
    value: int


class Pending(BaseModel):
    key: str  # the job's message key (what the reply answers)
    n: int
    number: int = 0  # the job's place among this entity's jobs (names its children)
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
        job = Pending(key=message.key, n=message.payload["n"], number=len(ctx.state.jobs) + 1)
        ctx.state.jobs.insert(job)
        try:
            for i in range(1, job.n + 1):
                await ctx.spawn(
                    "square",
                    f"{ctx.entity_id}-{job.number}-{i}",
                    args={"x": i, "delay_ms": message.payload["delay_ms"]},
                )
        except DuplicateEntity as exc:  # someone else took a child's id
            ctx.reply({"error": exc.message}, to=message)
            ctx.state.jobs.update(job.key, job.model_copy(update={"done": True}))
    for event in wake.wakes:
        child = event.get("finished_child")
        if child and child["run_status"] == "completed" and child["response"] is not None:
            number = child["url"].rsplit("-", 2)[-2]  # {fanout id}-{job}-{i}
            job = next(j for j in ctx.state.jobs.to_list() if str(j.number) == number)
            ctx.state.results.upsert(Result(key=child["url"], job=job.key, value=child["response"]))
    for job in ctx.state.jobs.to_list():
        results = [r.value for r in ctx.state.results.to_list() if r.job == job.key]
        if not job.done and len(results) >= job.n:
            ctx.reply(sum(results), to=job.key)
            ctx.state.jobs.update(job.key, job.model_copy(update={"done": True}))
