"""The steps of a request, timed, and (when an operator asks for it) run as Prefect task runs.

The pipeline calls its steps as plain coroutines: ``model = await authorize(req, svc, out)``. Each step is
decorated with ``@step``, which times it into the request's trace (what a recorded ``infer-record`` run shows)
and, only inside a tracked ``infer`` flow run, hands it to the runner the Prefect side installed
(``flows/control_plane.py``). The serving side imports no Prefect for this.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

# (step name, the undecorated step, its arguments) -> its result; set by a tracked flow run for its own context.
StepRunner = Callable[[str, Callable[..., Awaitable[Any]], tuple[Any, ...]], Awaitable[Any]]

step_runner: ContextVar[StepRunner | None] = ContextVar("first_step_runner", default=None)
step_trace: ContextVar[list[dict[str, Any]] | None] = ContextVar("first_step_trace", default=None)


def step(name: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Mark a coroutine as one named step of the inference pipeline."""

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def traced(*args: P.args, **kwargs: P.kwargs) -> R:
            runner, trace = step_runner.get(), step_trace.get()
            t0, ok = time.perf_counter(), False
            try:
                result = await (runner(name, fn, args) if runner is not None else fn(*args, **kwargs))
                ok = True
                return result
            finally:
                if trace is not None:
                    trace.append({"step": name, "ms": round((time.perf_counter() - t0) * 1000, 3), "ok": ok})

        traced.step_name = name  # type: ignore[attr-defined]
        return traced

    return decorate
