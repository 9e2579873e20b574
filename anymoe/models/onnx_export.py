"""ONNX export for inference: logits [B, S, V] from input ids [B, S], dynamic B and S.

The MoE layers are exported through the "every expert, weighted by its gate" formulation
(``moe_dense.py``): the same function as the training path for dropless routing, with no
data-dependent shapes. The sort-and-gather dispatch (argsort + index ops with shapes set by
the routing) does not export with either exporter, the dense einsum form does with both
(checked with torch 2.13: dynamo and TorchScript exporters).

The exported graph has no KV cache: it is the full-sequence forward (scoring, ranking,
single-pass inference). ``verify_onnx`` runs onnx.checker and compares ONNX Runtime's
logits with PyTorch's on random inputs of given shapes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from anymoe.models.transformer import MoETransformer


class LogitsOnly(nn.Module):
    """input_ids [B, S] -> logits [B, S, V], MoE layers in the every-expert formulation."""

    def __init__(self, model: MoETransformer) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).cpu().float().eval()
        self.model.set_export_formulation()

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)


def export_onnx(
    model: MoETransformer,
    path: str | os.PathLike,
    *,
    exporter: str = "dynamo",
    opset: int = 18,
    example_shape: tuple[int, int] = (2, 8),
    max_batch: int = 1024,
    max_seq: int | None = None,
) -> Path:
    """Write ``model`` as ONNX with dynamic batch and sequence axes; returns the path.

    exporter: "dynamo" (torch.export based) or "legacy" (TorchScript tracing).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = LogitsOnly(model).eval()
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, example_shape)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        seq = torch.export.Dim("sequence", min=2, max=max_seq or cfg.max_seq_len)
        program = torch.onnx.export(
            module,
            (ids,),
            dynamo=True,
            opset_version=opset,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}},
            verbose=False,
        )
        program.save(str(tmp))
    elif exporter == "legacy":
        torch.onnx.export(
            module,
            (ids,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}},
        )
    else:
        raise ValueError(f"exporter must be dynamo or legacy; got {exporter!r}")
    os.replace(tmp, path)
    return path


def verify_onnx(
    model: MoETransformer,
    path: str | os.PathLike,
    shapes: Sequence[tuple[int, int]] = ((1, 5), (3, 17)),
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[float]:
    """onnx.checker, then max |ONNX Runtime - PyTorch| of the logits for each input shape,
    the PyTorch reference computed in fp32 on ``device``."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = copy.deepcopy(model).float().to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    diffs = []
    for shape in shapes:
        ids = torch.randint(0, model.cfg.vocab_size, shape, generator=gen)
        (got,) = session.run(["logits"], {"input_ids": ids.numpy()})
        with torch.no_grad():
            want = ref(ids.to(device)).cpu()
        diffs.append(float((torch.from_numpy(got) - want).abs().max()))
    return diffs


__all__ = ["LogitsOnly", "export_onnx", "verify_onnx"]
