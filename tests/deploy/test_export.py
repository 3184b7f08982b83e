"""The detector through torch.export (saved and re-loaded) and ONNX, at other sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msdeformattn.models import DeformableDETRConfig, build_model

N = torch.export.Dim("N", min=1, max=16)
h = torch.export.Dim("h", min=3, max=64)
w = torch.export.Dim("w", min=3, max=64)
# Sizes are multiples of 32 (the backbone's stride); the example must have more
# than one pixel in every level, or export specialises that level to 1.
DYNAMIC = ({0: N, 2: 32 * h, 3: 32 * w}, {0: N, 1: 32 * h, 2: 32 * w})
SIZES = [(1, 96, 128), (3, 160, 224), (2, 192, 96)]


def detector():
    torch.manual_seed(0)
    model = build_model(DeformableDETRConfig.tiny()).eval()
    # The initialisation zeroes the box heads; random ones make boxes depend on the decoder.
    with torch.no_grad():
        for p in model.bbox_embed.parameters():
            p.normal_(0, 0.1)
    return model


def example(n, hh, ww, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, hh, ww, generator=g)
    mask = torch.zeros(n, hh, ww, dtype=torch.bool)
    if n > 1:
        mask[-1, :, ww // 2 :] = True  # the last image is half padding
    return images, mask


def test_torch_export_saved_and_reloaded_runs_other_sizes(tmp_path):
    model = detector()
    program = torch.export.export(model, example(2, 128, 160), dynamic_shapes=DYNAMIC)
    path = tmp_path / "detector.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    for i, size in enumerate(SIZES):
        images, mask = example(*size, seed=i + 1)
        with torch.no_grad():
            got, expected = loaded(images, mask), model(images, mask)
        torch.testing.assert_close(got["pred_logits"], expected["pred_logits"])
        torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"])


def test_onnx_export_runs_other_sizes_and_batches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = detector()
    path = tmp_path / "detector.onnx"
    torch.onnx.export(
        model,
        example(2, 128, 160),
        str(path),
        input_names=["images", "mask"],
        dynamic_shapes=DYNAMIC,
    )
    session = ort.InferenceSession(str(path))
    for i, size in enumerate(SIZES):
        images, mask = example(*size, seed=i + 1)
        logits, boxes = session.run(None, {"images": images.numpy(), "mask": mask.numpy()})[:2]
        with torch.no_grad():
            expected = model(images, mask)
        np.testing.assert_allclose(logits, expected["pred_logits"].numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(boxes, expected["pred_boxes"].numpy(), atol=1e-5, rtol=1e-4)
