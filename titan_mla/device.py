"""Let torchtitan train on the CPU when the machine has no GPU.

Without a GPU titan_mla trains on the CPU (gloo, one rank or several, FSDP2 included). torchtitan 0.2.2 picks
its device once, at import, and falls back to "cuda" when there is no accelerator; the one local
adaptation is to let it pick "cpu" with a device module that answers the few CUDA-only questions
it asks (device name, memory statistics, synchronize). It must run before torchtitan is imported, so
titan_mla/__init__.py runs it first.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import torch


def cpu_device_module() -> ModuleType:
    """torch.cpu plus the memory/properties API torchtitan's metrics and profiler call on a device."""
    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    module = ModuleType("titan_mla_cpu_device")
    module.__dict__.update(vars(torch.cpu))
    module.__dict__.update(
        current_device=lambda: 0,
        get_device_name=lambda device=None: "CPU",
        get_device_properties=lambda device=None: SimpleNamespace(total_memory=total_memory),
        memory_stats=lambda device=None: {},
        reset_peak_memory_stats=lambda device=None: None,
        empty_cache=lambda: None,
        memory=SimpleNamespace(
            _record_memory_history=lambda *args, **kwargs: None,
            _snapshot=lambda: {"segments": [], "device_traces": []},
        ),
    )
    return module


@contextlib.contextmanager
def _torchtitan_sees_cpu() -> Iterator[None]:
    import torch._utils as torch_utils

    original = torch_utils._get_available_device_type, torch_utils._get_device_module
    device_module = cpu_device_module()
    torch_utils._get_available_device_type = lambda: "cpu"
    torch_utils._get_device_module = lambda device_type=None: device_module
    try:
        yield
    finally:
        torch_utils._get_available_device_type, torch_utils._get_device_module = original


def configure_torchtitan_device() -> str:
    """Import torchtitan so that it trains on this machine's device; returns that device type.

    On a machine without CUDA this must happen before anything imports torchtitan (importing
    titan_mla does it first).
    """
    if torch.cuda.is_available() or "torchtitan.tools.utils" in sys.modules:
        import torchtitan.tools.utils
    else:
        with _torchtitan_sees_cpu():
            import torchtitan.tools.utils  # binds device_type/device_module for all of torchtitan
        import torch.distributed as dist

        # torchtitan's barrier passes device_ids, which gloo rejects; a CPU barrier needs none.
        barrier = dist.barrier
        dist.barrier = lambda group=None, async_op=False, device_ids=None: barrier(group, async_op)
    return torchtitan.tools.utils.device_type
