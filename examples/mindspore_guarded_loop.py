"""A MindSpore training loop of your own, guarded by nanguard (runs on the CPU in a few seconds).

    python examples/mindspore_guarded_loop.py            # graph mode
    python examples/mindspore_guarded_loop.py --pynative

Step 5's batch holds a NaN: the guard skips that step inside the compiled cell (weights, optimizer
moments and BatchNorm statistics stay as they were), reports it one step late, and training goes on.
"""

import argparse

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from nanguard.backends.mindspore import GuardedTrainStep, StepReader
from nanguard.guard import GuardConfig


class NetWithLosses(nn.Cell):
    """Your network, returning its loss components as a tuple of scalars."""

    def __init__(self):
        super().__init__()
        self.body = nn.SequentialCell([nn.Dense(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dense(16, 3)])

    def construct(self, x, labels):
        logits = self.body(x)
        return ops.cross_entropy(logits, labels), 1e-3 * (logits ** 2).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pynative", action="store_true")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE if args.pynative else ms.GRAPH_MODE)
    ms.set_seed(0)
    net = NetWithLosses()
    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=1e-4)
    step = GuardedTrainStep(net, optimizer, GuardConfig(clip_norm=1.0))
    reader = StepReader(("cls", "size"))

    rng = np.random.default_rng(0)
    skipped = 0
    for i in range(args.steps):
        x = rng.normal(size=(32, 4)).astype(np.float32)
        labels = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)
        if i == 5:
            x[7, 2] = np.nan  # a corrupt sample
        observations = reader.push(i, *step(Tensor(x), Tensor(labels)))
        for o in observations + (reader.flush() if i == args.steps - 1 else []):
            if not o.applied:
                skipped += 1
                print(f"step {o.step}: skipped ({', '.join(o.kinds())})")
            else:
                print(f"step {o.step}: loss {o.total_loss:.4f}, grad norm {o.grad_norm:.3f}")
    finite = all(np.isfinite(p.asnumpy()).all() for p in net.get_parameters())
    print(f"{skipped} step(s) skipped; weights finite: {finite}")


if __name__ == "__main__":
    main()
