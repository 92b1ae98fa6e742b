"""What the guard checks on the device every step (`guard.*` in the config): `GuardConfig`, defined
with the other settings in `nanguard.config` (the bottom layer) and re-exported here."""

from nanguard.config import GuardConfig

__all__ = ["GuardConfig"]
