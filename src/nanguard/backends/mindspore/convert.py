"""Weights between the PyTorch and MindSpore Faster R-CNN (`tiny`, `resnet50_fpn`), by renaming (numpy
arrays both ways; imports neither framework's model).

    arrays = torch_to_mindspore({k: v.numpy() for k, v in torch_model.state_dict().items()})
    load_arrays(ms_model, arrays)
    state = mindspore_to_torch(mindspore_arrays(ms_model))   # torch.from_numpy each, then load_state_dict

The two models share their module paths (`nanguard.backends.mindspore.model` mirrors torchvision's), except
that the MindSpore `tiny` body keeps its blocks in a `layers` list and BatchNorm names its tensors gamma, beta,
moving_mean and moving_variance. torch's `num_batches_tracked` has no MindSpore counterpart (BatchNorm's
momentum is fixed, so nothing reads it): it is dropped one way and set to 0 the other.
"""

from __future__ import annotations

import re

import numpy as np

_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
_BN_BACK = {v: k for k, v in _BN.items()}


def _is_batchnorm(name: str, keys: set[str]) -> bool:
    """A torch tensor belongs to a BatchNorm when its module also has running statistics."""
    module = name.rsplit(".", 1)[0]
    return f"{module}.running_mean" in keys


def torch_to_mindspore(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = set(state)
    out = {}
    for name, value in state.items():
        module, leaf = name.rsplit(".", 1)
        if leaf == "num_batches_tracked":
            continue
        if _is_batchnorm(name, keys):
            leaf = _BN[leaf]
        module = re.sub(r"^backbone\.body\.(\d+)", r"backbone.body.layers.\1", module)
        out[f"{module}.{leaf}"] = np.asarray(value)
    return out


def mindspore_to_torch(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in params.items():
        module, leaf = name.rsplit(".", 1)
        module = re.sub(r"^backbone\.body\.layers\.(\d+)", r"backbone.body.\1", module)
        if leaf in _BN_BACK:
            leaf = _BN_BACK[leaf]
            if leaf == "running_mean":
                out[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
        out[f"{module}.{leaf}"] = np.asarray(value)
    return out


def mindspore_arrays(model) -> dict[str, np.ndarray]:
    """Every Parameter of a MindSpore model as a numpy array, by name."""
    return {name: p.asnumpy() for name, p in model.parameters_and_names()}


def load_arrays(model, arrays: dict[str, np.ndarray]) -> None:
    """Set every Parameter of `model` from `arrays` (see `set_parameters`): a converted model must be the
    same model."""
    set_parameters(dict(model.parameters_and_names()), arrays, "weights")


def set_parameters(params: dict, arrays: dict[str, np.ndarray], what: str) -> None:
    """Set each Parameter of `params` (by name) from `arrays`; a missing, extra or misshapen tensor is a
    ValueError naming it. A .ckpt stores a 0-dim tensor as shape (1,): equal sizes of at most one
    dimension are taken as the same shape."""
    import mindspore as ms

    missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
    if missing or extra:
        raise ValueError(f"{what} do not fit: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for name, p in params.items():
        value = np.asarray(arrays[name])
        shape = tuple(p.shape)
        if value.shape != shape and (value.size != int(np.prod(shape)) or max(value.ndim, len(shape)) > 1):
            raise ValueError(f"{what} do not fit: {name} is {tuple(value.shape)}, the model's {shape}")
        value = ms.Tensor(value.reshape(shape).astype(ms.dtype_to_nptype(p.dtype)))
        if p.has_init:  # not materialised yet: nothing compiled holds it
            p.set_data(value)
        else:  # after a graph's compile, set_data may leave the graph on the old memory (optimizer moments
            ms.ops.assign(p, value)  # did): assign writes into the Parameter's own, which the graph uses

