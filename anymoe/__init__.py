"""anymoe: Mixture-of-Experts training and RLHF on NVIDIA, Ascend and CPU from one YAML config.

torch auto-loads installed device extensions when it is imported. An Ascend extension
(torch_npu) installed on a machine without the CANN runtime then breaks ``import torch``
itself, so anymoe turns auto-loading off before torch is imported and lets the backend
module import the extension explicitly, where a failure becomes a readable reason.
"""

import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

__version__ = "0.1.0"
