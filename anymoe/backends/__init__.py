"""One module per compute target; importing this package registers them all.

Everything device-specific in anymoe lives in this folder and only here.
"""

from anymoe.backends import cpu, cuda, npu  # noqa: F401  (registration side effect)
