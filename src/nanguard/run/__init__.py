"""The framework-neutral run: the run folder and its lock, data resolution and the audit before step 0,
the training loop, metrics, incidents, checkpoints and their cadence, final.json and the evaluation.
It drives a backend (`nanguard.run.backend.Backend`) and imports no framework."""
