"""A GuardedTrainStep's whole state goes through a MindSpore checkpoint and the run continues
bit-identically (CPU); a damaged or foreign file is one clear error."""

from __future__ import annotations

import math

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="mindspore is not installed (make install installs it)")
from mindspore import Tensor, nn, ops  # noqa: E402

from nanguard.backends.mindspore import GuardedTrainStep  # noqa: E402
from nanguard.backends.mindspore.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from nanguard.errors import UserError  # noqa: E402


class Net(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.SequentialCell([nn.Dense(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dense(8, 2)])

    def construct(self, x, y, poison):
        out = self.body(x)
        return ((out - y) ** 2).mean(), ops.abs(out).mean() * 0.1 * poison


def build():
    ms.set_seed(0)
    net = Net()
    return GuardedTrainStep(net, nn.Adam(net.trainable_params(), learning_rate=1e-2), loss_scale=2.0 ** 10,
                            scale_window=3)


def batches(n):
    rng = np.random.default_rng(0)
    return [(Tensor(rng.normal(size=(8, 4)).astype(np.float32)), Tensor(rng.normal(size=(8, 2)).astype(np.float32)),
             Tensor(np.float32(math.nan if i == 4 else 1.0))) for i in range(n)]


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_a_checkpointed_step_continues_bit_identically(tmp_path, mode):
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        data = batches(10)
        straight = build()
        vectors = [straight(*b)[1].asnumpy() for b in data]
        first = build()
        for b in data[:6]:  # a skipped step (4) and the spike windows, moments, scale all in the state
            first(*b)
        save_checkpoint(tmp_path / "step_6.ckpt", first.state_arrays(), {"steps_run": 6})
        arrays, meta = load_checkpoint(tmp_path / "step_6.ckpt")
        assert meta == {"steps_run": 6}
        resumed = build()
        resumed.load_state_arrays(arrays)
        resumed_vectors = [resumed(*b)[1].asnumpy() for b in data[6:]]
        np.testing.assert_array_equal(np.array(resumed_vectors), np.array(vectors[6:]))
        for name, value in straight.state_arrays().items():
            np.testing.assert_array_equal(resumed.state_arrays()[name], value, err_msg=name)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_damaged_and_foreign_checkpoints_are_refused_by_name(tmp_path):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    step = build()
    path = save_checkpoint(tmp_path / "good.ckpt", step.state_arrays(), {"steps_run": 1})
    (tmp_path / "torn.ckpt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="torn.ckpt: cannot read this checkpoint"):
        load_checkpoint(tmp_path / "torn.ckpt")
    ms.save_checkpoint(Net(), str(tmp_path / "foreign.ckpt"))
    with pytest.raises(UserError, match="foreign.ckpt: cannot read this checkpoint \\(it is not a nanguard"):
        load_checkpoint(tmp_path / "foreign.ckpt")
    arrays, _ = load_checkpoint(path)
    arrays.pop(sorted(arrays)[0])
    with pytest.raises(ValueError, match="missing"):
        build().load_state_arrays(arrays)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.ckpt", "good.ckpt", "torn.ckpt"]  # no temp files left
