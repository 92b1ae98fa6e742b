"""The MindSpore backend. `GuardedTrainStep` guards a user's own MindSpore training loop; see
`nanguard.backends.mindspore.step`.

Importing this package caps MindSpore's own oneDNN at AVX2 on x86 CPUs (its float32 3x3 convolution
falls to a scalar kernel with AVX-512); `runtime.py` says why and how to opt out."""

from nanguard.backends.mindspore.runtime import cap_onednn_isa

cap_onednn_isa()

from nanguard.backends.mindspore.step import DeviceSpikes, GuardedTrainStep, StepReader  # noqa: E402

__all__ = ["DeviceSpikes", "GuardedTrainStep", "StepReader"]
