"""Process-level settings of a run: torch's CPU thread count."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op CPU threads set to ``n`` (0: unchanged) inside the block, restored after. A fixed count
    keeps float reductions, hence the reports, the same from run to run. Which count is faster depends on
    the load: on an idle 2-core machine two threads win (a cnn epoch on cached features 2.6 s against 4.1 s
    with one), on a busy one a single thread does (4.7 s against 49 s, measured while other jobs ran; the
    methods' small heads were measured 3-20x faster with one)."""
    before = torch.get_num_threads()
    if int(n) > 0:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
