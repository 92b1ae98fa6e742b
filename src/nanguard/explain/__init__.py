"""Explaining incidents (framework-neutral): replay facts from a backend -> a verdict and advice
(`verdict`), incident folders and the trainer's side (`diagnose`), `nanguard diagnose` (`command`)."""
