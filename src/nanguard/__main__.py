"""`python -m nanguard ...` is `nanguard ...` (torchrun starts each rank this way)."""

from nanguard.cli import main_entry

main_entry()
