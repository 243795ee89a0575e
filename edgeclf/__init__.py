"""edgeclf: medical image classifiers from the workstation to point-of-care devices.

This module stays light and Python 3.8 compatible: importing edgeclf.runtime on a device runs it.
"""
from __future__ import annotations

import os as _os

from edgeclf.errors import EdgeclfError

__all__ = ["EdgeclfError", "__version__"]
__version__ = "0.1.0"

# pyproject maps the top-level runtime/, export/ and devices/ folders into edgeclf.*. Installed,
# they sit inside this package; in a source checkout that is itself on sys.path (python -m pytest or
# python -m edgeclf from the repo root) they sit beside it, so the checkout joins the search path.
_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "runtime")) and _os.path.isfile(_os.path.join(_checkout, "runtime", "__init__.py")):
    __path__.append(_checkout)
