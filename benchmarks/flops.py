"""FLOPs of one call as torch.utils.flop_counter sees them, shared by the benchmarks and their tests."""
from __future__ import annotations

from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


class NoModuleTracker:
    """Patch: FlopCounterMode's per-module tracker fails on pass 1 of #3 (a no-grad view of the
    grad-carrying text keys/values has requires_grad but no grad_fn); totals need no tracker."""

    parents = {"Global"}
    is_bw = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def counted_flops(fn) -> int:
    """Matrix-multiply, convolution and attention FLOPs of one call. Attention runs on the math
    kernel while counting: the CPU flash kernel has no FLOP formula, and the math kernel counts
    masked and causal pairs like any other."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = NoModuleTracker()
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return int(counter.get_total_flops())
