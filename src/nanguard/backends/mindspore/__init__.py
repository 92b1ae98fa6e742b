"""The MindSpore backend. `GuardedTrainStep` guards a user's own MindSpore training loop; see
`nanguard.backends.mindspore.step`."""

from nanguard.backends.mindspore.step import DeviceSpikes, GuardedTrainStep, StepReader

__all__ = ["DeviceSpikes", "GuardedTrainStep", "StepReader"]
