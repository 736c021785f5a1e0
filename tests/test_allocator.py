"""keep_freed_memory: freed activation buffers are reused instead of faulted in afresh."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from din_ray.allocator import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux's")
def test_freed_blocks_are_reused_without_page_faults():
    # In place for the rest of this process, as in every training worker and replica.
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
    x = torch.ones(1 << 20)

    def chain():  # 4-8 MB activations, each written, then freed
        y = torch.cat([x * 2, x])
        (y + 1).sigmoid_()

    for _ in range(10):  # the heap grows to the chain's high-water mark
        chain()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        chain()
    # With glibc's defaults each fresh 4-8 MB block is new memory, 1,000-2,000 page faults each
    # (8,000-28,000 here over the 50 chains, as glibc adapts); kept, the heap's pages are reused.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2_000
