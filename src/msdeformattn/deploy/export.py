"""The detector to an ONNX file or a torch.export program, for any image size.

Both files take ``images`` (N, 3, H, W) float and ``mask`` (N, H, W) bool (True
on padding) with N, H and W dynamic, and give ``pred_logits`` (N, Q, K) and
``pred_boxes`` (N, Q, 4) only: the decoder's earlier layers and the two-stage
proposals, which only the training losses read, are left out. The graph pads
its input to the backbone's stride (right and bottom, the mask marking the new
pixels), so H and W need not be multiples of it; the outputs are those of the
eager model on the padded input.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..models import DeformableDETR
from ..models.deformable_detr import pad_to_stride

__all__ = ["export_onnx", "export_program", "min_image_size"]

INPUT_NAMES = ("images", "mask")
OUTPUT_NAMES = ("pred_logits", "pred_boxes")


class _Detections(nn.Module):
    """The detector on its input padded to the backbone's stride, final outputs only.

    Padding inside the graph makes every level's size an exact division of the
    input's, so one capture serves every H and W; outputs equal
    ``model(*pad_to_stride(images, mask, stride))``.
    """

    def __init__(self, model: DeformableDETR) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(*pad_to_stride(images, mask, max(self.model.backbone.strides)))
        return {name: out[name] for name in OUTPUT_NAMES}


def min_image_size(model: DeformableDETR) -> int:
    """The smallest height and width an export serves: one pixel more than the coarsest
    level's stride, so that every level is at least 2 cells (the capture specialises a
    size of 1)."""
    strides = model.backbone.strides
    return max(strides) * 2 ** (model.num_feature_levels - len(strides)) + 1


def _prepared(
    model: DeformableDETR, image_size: tuple[int, int], max_batch: int, max_size: int
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[dict, dict]]:
    """The eval-mode wrapper, example inputs (batch 2) and the dynamic shapes."""
    low = min_image_size(model)
    if len(image_size) != 2 or not all(low <= s <= max_size for s in image_size):
        raise ValueError(
            f"image_size must be (H, W) with each side {low} to max_size={max_size} "
            f"for this model, got {tuple(image_size)}"
        )
    if max_batch < 2:
        raise ValueError(f"max_batch must be at least 2, got {max_batch}")
    H, W = image_size
    param = next(model.parameters())
    images = torch.zeros(2, 3, H, W, dtype=param.dtype, device=param.device)
    mask = torch.zeros(2, H, W, dtype=torch.bool, device=param.device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    height = torch.export.Dim("height", min=low, max=max_size)
    width = torch.export.Dim("width", min=low, max=max_size)
    dynamic = ({0: batch, 2: height, 3: width}, {0: batch, 1: height, 2: width})
    return _Detections(model).eval(), (images, mask), dynamic


def export_program(
    model: DeformableDETR,
    path: str | os.PathLike,
    image_size: tuple[int, int] = (800, 1066),
    *,
    max_batch: int = 64,
    max_size: int = 4096,
) -> torch.export.ExportedProgram:
    """Capture the detector with ``torch.export`` and save it to ``path`` (``.pt2``).

    Args:
        model: the detector; it is put in eval mode.
        path: the file to write.
        image_size: (H, W) of the example the capture traces; any size from
            :func:`min_image_size` to ``max_size`` runs afterwards.
        max_batch: the largest batch the program accepts.
        max_size: the largest height and width it accepts.

    Returns:
        The program. ``torch.export.load(path).module()(images, mask)`` with images
        (N, 3, H, W) and mask (N, H, W) bool, True on padding, returns
        ``{"pred_logits": (N, Q, K), "pred_boxes": (N, Q, 4)}``; the fused operator
        stays one node and runs on the backends of the loading process.

    Raises:
        ValueError: an image_size outside the range, or max_batch below 2.
    """
    module, example, dynamic = _prepared(model, image_size, max_batch, max_size)
    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=dynamic)
    torch.export.save(program, path)
    return program


def export_onnx(
    model: DeformableDETR,
    path: str | os.PathLike,
    image_size: tuple[int, int] = (800, 1066),
    *,
    max_batch: int = 64,
    max_size: int = 4096,
    opset_version: int | None = None,
) -> torch.onnx.ONNXProgram:
    """Export the detector to an ONNX file of standard operators only.

    Args:
        model: the detector; it is put in eval mode.
        path: the file to write.
        image_size: (H, W) of the example the export traces; any size from
            :func:`min_image_size` to ``max_size`` runs afterwards.
        max_batch: the largest batch the graph is declared for.
        max_size: the largest height and width it is declared for.
        opset_version: ONNX opset; ``None`` for the exporter's default.

    Returns:
        The ONNX program. Inputs ``images`` (N, 3, H, W) float and ``mask`` (N, H, W)
        bool, True on padding; outputs ``pred_logits`` (N, Q, K) and ``pred_boxes``
        (N, Q, 4), normalised (cx, cy, w, h).

    Raises:
        ValueError: an image_size outside the range, or max_batch below 2.
    """
    module, example, dynamic = _prepared(model, image_size, max_batch, max_size)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            example,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=dynamic,
            opset_version=opset_version,
        )
    # One file (weights inline) unless the model passes ONNX's 2 GB limit.
    program.save(os.fspath(path))
    return program
