"""nanguard: Faster R-CNN training that a NaN or Inf can neither kill nor silently ruin."""

from nanguard.errors import UserError

__all__ = ["UserError", "__version__"]
__version__ = "0.1.0"
