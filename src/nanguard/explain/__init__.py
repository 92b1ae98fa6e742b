"""Explaining incidents (framework-neutral): replay facts from a backend -> a verdict and advice
(`verdict`), incident folders and the trainer's side (`diagnose`). Run imports explain, never the other
way: `nanguard diagnose` is `nanguard.run.diagnose_command` (`command` only forwards to it)."""
