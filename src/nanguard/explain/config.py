"""`explain.*` in the config. `ExplainConfig` lives in `nanguard.config` (the bottom layer, which imports
no feature package); it is re-exported here so that `nanguard.explain.config.ExplainConfig` keeps
working."""

from nanguard.config import ExplainConfig

__all__ = ["ExplainConfig"]
