"""The process-wide MindSpore settings nanguard makes, and the facts a run records about them.

    from nanguard.backends.mindspore import runtime
    runtime.facts()   # {"onednn_max_cpu_isa": "avx2 (capped by nanguard)", "ascend_overflow_mode": ...}

**oneDNN's ISA on x86 CPUs.** MindSpore 2.10's own oneDNN (`mindspore/lib/libdnnl.so.3`) runs a float32
3x3 convolution in NCHW with a reference (scalar) kernel on CPUs with AVX-512: `ONEDNN_VERBOSE=1` prints
`jit_uni_ncsp:conv+ref:any`, two orders of magnitude slower than with the ISA capped at AVX2
(`x64:gemm:jit`; the README has the measurement). Importing `nanguard.backends.mindspore` therefore caps MindSpore's oneDNN at AVX2 through its C API
(`dnnl_set_max_cpu_isa`), before its first primitive. Only MindSpore's copy of the library is touched:
torch links its own oneDNN, and an environment variable would cap that one too (torch's CPU step was
slower with it). A user's own `ONEDNN_MAX_CPU_ISA` or `DNNL_MAX_CPU_ISA` is left to decide.

**Ascend's overflow mode.** The guard checks values for finiteness. On Ascend 910 (the first training
chips) the default is saturation mode, where an overflow becomes the largest float and a NaN becomes 0:
values stay finite and the check cannot see it. nanguard needs `MS_ASCEND_CHECK_OVERFLOW_MODE=INFNAN_MODE`
there (the default on Ascend 910B and later). A run records the mode it ran under; nothing here can test
an Ascend device, so that is all this module does about it.
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

ISA_AVX2 = 0x7  # dnnl_cpu_isa_avx2 in oneDNN 3.x (dnnl_types.h)
USER_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
_isa_note: str | None = None


def cap_onednn_isa() -> str:
    """Cap MindSpore's oneDNN at AVX2 on x86-64 (once per process); returns what was done, in words."""
    global _isa_note
    if _isa_note is not None:
        return _isa_note
    user = next((f"{v}={os.environ[v]} (the user's)" for v in USER_ISA_VARIABLES if os.environ.get(v)), None)
    if user is not None:
        _isa_note = user
    elif platform.machine().lower() not in ("x86_64", "amd64"):
        _isa_note = f"not capped ({platform.machine()}: no x86 ISA to choose)"
    else:
        _isa_note = _set_isa()
    return _isa_note


def _set_isa() -> str:
    import mindspore

    library = Path(mindspore.__file__).parent / "lib" / "libdnnl.so.3"
    if not library.is_file():
        return f"not capped (no {library.name} in this MindSpore)"
    try:
        status = ctypes.CDLL(str(library)).dnnl_set_max_cpu_isa(ISA_AVX2)
    except (OSError, AttributeError) as exc:
        return f"not capped ({library.name}: {exc})"
    # 0 = success; anything else: oneDNN had already run a primitive (the ISA is fixed at first use)
    return "avx2 (capped by nanguard)" if status == 0 else f"not capped (oneDNN was already in use: status {status})"


def ascend_overflow_mode() -> str:
    mode = os.environ.get("MS_ASCEND_CHECK_OVERFLOW_MODE")
    if mode:
        return mode
    return "unset: the chip's default (SATURATION_MODE on Ascend 910, INFNAN_MODE on 910B and later)"


def facts(device_target: str = "CPU") -> dict[str, str]:
    """What a MindSpore run records about the process it ran in."""
    import mindspore

    return {
        "mindspore": mindspore.__version__,
        "device_target": device_target,
        "onednn_max_cpu_isa": cap_onednn_isa(),
        "ascend_overflow_mode": ascend_overflow_mode() if device_target == "Ascend" else
        f"not applicable on {device_target} (on Ascend, nanguard needs INFNAN_MODE)",
    }
