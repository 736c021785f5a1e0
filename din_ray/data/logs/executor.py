"""How the tasks of one log-pipeline stage run: `run_stage` maps a stage's UDF over its work
items with Ray Data (`from_items(items).map_batches(fn)`, one task per item, one CPU each), or,
with executor="local", runs the same tasks one after the other in this process, without Ray.
Either way it yields the tasks' unpickled summaries. A DataError or FileNotFoundError raised in
a task reaches the caller as itself, unwrapped from Ray's task errors.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator

from din_ray.data.format import DataError

log = logging.getLogger(__name__)


def run_stage(name: str, items: list[dict], fn, kwargs: dict, executor: str = "ray"
              ) -> Iterator:
    """`from_items(items).map_batches(fn)`, one task per item; yields the unpickled summaries.
    executor="local" runs the same tasks one after the other in this process (no Ray)."""
    if executor == "local":
        for item in items:
            for out in fn({k: [v] for k, v in item.items()}, **kwargs):
                for blob in out["summary"]:
                    yield pickle.loads(blob)
        return
    import ray

    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
    out = ds.map_batches(fn, batch_size=1, batch_format="numpy", fn_kwargs=kwargs, num_cpus=1)
    log.info("%s: %d tasks", name, len(items))
    try:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            for blob in batch["summary"]:
                yield pickle.loads(blob)
    except Exception as e:
        user = _input_error(e)
        if user is None:
            raise
        raise user from e


def _input_error(error: BaseException) -> Exception | None:
    """The DataError / FileNotFoundError a task raised, unwrapped from Ray's task errors, so
    callers (and the CLI) see one clear message naming the file."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if type(e) in (DataError, FileNotFoundError):
            return type(e)(*e.args)
        stack.extend([e.__context__, e.__cause__, cause])
    return None
