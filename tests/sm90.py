"""Triton and Gluon kernels compiled for H100 (sm_90) on a machine without a GPU: ptxas reports
registers, spills, shared memory and serialized wgmma. Imported by the subprocess scripts of the
sm_90 compile tests (a test process has the interpreter on; those scripts run without it)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

MAX_SHARED = 232448  # bytes of shared memory a block may use on H100


class Sm90Build(NamedTuple):
    registers: str  # "Used N registers"
    spill_stores: int  # bytes
    shared: int  # bytes
    # ptxas C7515: wgmma instructions serialized (an in-flight accumulator touched by other
    # instructions), which costs a wgmma kernel its overlap of the tensor cores with the rest.
    wgmma_serialized: bool


def compile_for_sm90(
    kernel: triton.JITFunction,
    signature: dict[str, str],
    constants: dict[str, object],
    num_warps: int,
    num_stages: int | None = None,
) -> Sm90Build:
    """What ptxas reports of ``kernel`` built for sm_90. Pointers and strides are specialized as
    divisible by 16, as the launchers' are."""
    signature = {**signature, **dict.fromkeys(constants, "constexpr")}
    attrs = {
        (kernel.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, kind in signature.items()
        if kind[0] == "*" or "stride" in name
    }
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    source = GluonASTSource if kernel.is_gluon() else ASTSource
    compiled = triton.compile(
        source(kernel, signature, constants, attrs),
        target=GPUTarget("cuda", 90, 32),
        options=options,
    )
    ptx = Path(tempfile.mkdtemp()) / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    report = subprocess.run(
        [str(ptxas), "-v", "--gpu-name=sm_90a", str(ptx), "-o", "/dev/null"],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    return Sm90Build(
        registers=re.search(r"Used \d+ registers", report).group(0),
        spill_stores=int(re.search(r"(\d+) bytes spill stores", report).group(1)),
        shared=compiled.metadata.shared,
        wgmma_serialized="C7515" in report,
    )
