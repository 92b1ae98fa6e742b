"""`nanguard train --nproc N`: torch.distributed's own launcher (torchrun), run in the launching process.

It starts the ranks, waits for them and restarts them as told (`--max-restarts`). A rank that fails
ends the job in one line naming it and its exit code or signal (each rank printed its own error above),
not in torchrun's traceback and log lines.
"""

from __future__ import annotations

import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def launch(launcher_args: list[str]) -> int:
    """torchrun with `launcher_args`; the exit code: 0, 2 when every failed rank refused its input, 1
    for any other failure, 128 + N when signal N stopped this process, 130 on Ctrl-C."""
    # torchrun's own log lines (its OMP_NUM_THREADS notice, "Sending process ... SIGTERM", "failed
    # (exitcode ...)"): the one line below says what they say
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.run").setLevel(logging.CRITICAL)
    try:
        run(parse_args(launcher_args))
    except SignalException as err:  # SIGTERM or SIGHUP to this process: torchrun has stopped the ranks
        print(f"nanguard train: stopped by signal {int(err.sigval)}; the run folder keeps the checkpoints "
              "written so far (resume it with --resume)", file=sys.stderr)
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        failed = sorted(err.failures.items())
        # the ranks torchrun stopped itself (SIGTERM) once one failed are not the ones at fault
        failed = [(rank, f) for rank, f in failed if f.exitcode != -signal.SIGTERM] or failed
        ranks = ", ".join(f"rank {rank} (killed by signal {-failure.exitcode})" if failure.exitcode < 0 else
                          f"rank {rank} (exit code {failure.exitcode})" for rank, failure in failed)
        own = "" if all(failure.exitcode < 0 for _, failure in failed) else "; its own message is above"
        print(f"nanguard train: {ranks} failed{own}; the run folder keeps the checkpoints written so far "
              "(resume it with --resume)", file=sys.stderr)
        return 2 if all(failure.exitcode == 2 for _, failure in failed) else 1
    except KeyboardInterrupt:
        return 130
    return 0
