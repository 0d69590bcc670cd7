"""Jobs spread over the machine's cores: worker processes when there are several jobs, this process otherwise."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Optional, Sequence


def on_every_core(fn: Callable, jobs: Sequence, workers: int = 0, initializer: Optional[Callable] = None,
                  chunksize: int = 1) -> Iterator:
    """``fn(job)`` for every job, in order, as they finish: in ``workers`` processes (0: one per core, at most 8)
    when there are several jobs, else here. If the caller stops early (an error), queued jobs are cancelled."""
    workers = min(workers or min(os.cpu_count() or 1, 8), len(jobs))
    if workers <= 1:
        yield from map(fn, jobs)
        return
    pool = ProcessPoolExecutor(workers, initializer=initializer)
    try:
        yield from pool.map(fn, jobs, chunksize=chunksize)
    finally:
        pool.shutdown(cancel_futures=True)
