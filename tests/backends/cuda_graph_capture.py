"""One CUDA-graph capture for the GPU kernel tests (not a test module).

Imported by tests/backends/test_cuda_{kernels,loss_kernels,qk_rope}.py, which each capture a step
and replay it on new inputs copied into the captured buffers.
"""

import torch


def capture(step, warmup: int = 2):
    """(graph, outputs of the captured call). ``step`` runs ``warmup`` times on a side stream first
    (lazy initialisation, autotuning and allocator warm-up stay out of the graph), then once under
    capture, which fails on any host synchronisation inside."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
