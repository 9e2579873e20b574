"""A torch.compile backend that records the aten ops of the AOT forward and backward graphs it
is handed and runs them as they are: for tests of what an op family leaves in a compiled step
(its custom ops, and no concatenation, add or norm arithmetic around them)."""

from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd


def recording_backend():
    """(backend for ``torch.compile(..., backend=)``, the list the op names are appended to)."""
    targets: list[str] = []

    def record(gm, _inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record), targets
