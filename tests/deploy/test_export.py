"""The detector exported once (ONNX; torch.export saved and re-loaded), run at other sizes.

Heights and widths need not be multiples of the backbone's stride: the exported graph
pads to it, and equals the eager detector on the padded input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msdeformattn.deploy import export_onnx, export_program, min_image_size
from msdeformattn.models import DeformableDETRConfig, build_model
from msdeformattn.models.deformable_detr import pad_to_stride

from .conftest import op_types

EXPORT_SIZE = (128, 160)
# (batch, H, W): 160x213 is what predict makes of a 4:3 image; batch 3 holds a padded image.
SIZES = [(1, 160, 213), (1, 171, 160), (1, 237, 311), (3, 150, 190)]


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
        # The last image is a smaller one padded to the batch's canvas.
        images[-1, :, hh * 2 // 3 :] = 0
        images[-1, :, :, ww // 2 :] = 0
        mask[-1, hh * 2 // 3 :] = True
        mask[-1, :, ww // 2 :] = True
    return images, mask


@pytest.fixture(scope="module")
def model():
    return detector()


@pytest.fixture(scope="module")
def cases(model):
    """((images, mask), (pred_logits, pred_boxes) in eager mode) for each of SIZES."""
    out = []
    for i, size in enumerate(SIZES):
        images, mask = example(*size, seed=i + 1)
        with torch.no_grad():
            pred = model(*pad_to_stride(images, mask, 32))
        out.append(((images, mask), (pred["pred_logits"], pred["pred_boxes"])))
    return out


def check_onnx(path, cases):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path))
    for (images, mask), (logits, boxes) in cases:
        got = session.run(None, {"images": images.numpy(), "mask": mask.numpy()})
        size = tuple(images.shape)
        np.testing.assert_allclose(got[0], logits.numpy(), atol=1e-4, rtol=1e-4, err_msg=size)
        np.testing.assert_allclose(got[1], boxes.numpy(), atol=1e-4, rtol=1e-4, err_msg=size)
    return session


def test_pad_to_stride_pads_right_and_bottom_and_marks_the_new_pixels():
    images, mask = example(2, 150, 190)
    padded, padded_mask = pad_to_stride(images, mask, 32)
    assert padded.shape == (2, 3, 160, 192) and padded_mask.shape == (2, 160, 192)
    torch.testing.assert_close(padded[..., :150, :190], images, rtol=0, atol=0)
    assert (padded[..., 150:, :] == 0).all() and (padded[..., 190:] == 0).all()
    assert padded_mask[:, 150:].all() and padded_mask[..., 190:].all()
    torch.testing.assert_close(padded_mask[:, :150, :190], mask, rtol=0, atol=0)
    same, same_mask = pad_to_stride(padded, padded_mask, 32)
    assert same.shape == padded.shape and torch.equal(same_mask, padded_mask)


def test_image_size_below_the_minimum_is_refused(model, tmp_path):
    low = min_image_size(model)
    assert low == 65  # three backbone levels (stride 32) and one more (stride 64)
    with pytest.raises(ValueError, match=r"image_size must be \(H, W\) with each side 65 to"):
        export_onnx(model, tmp_path / "x.onnx", (low - 1, 128))


def test_onnx_runs_any_size_and_batch(model, cases, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path / "detector.onnx"
    program = export_onnx(model, path, EXPORT_SIZE, max_batch=8)
    assert not any("::" in op for op in op_types(program))
    session = check_onnx(path, cases)
    assert [i.name for i in session.get_inputs()] == ["images", "mask"]
    assert [o.name for o in session.get_outputs()] == ["pred_logits", "pred_boxes"]


@pytest.fixture(scope="module")
def program(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("program") / "detector.pt2"
    export_program(model, path, EXPORT_SIZE, max_batch=8)
    return path


def test_program_saved_and_reloaded_runs_any_size_and_batch(program, cases):
    loaded = torch.export.load(program).module()
    for (images, mask), (logits, boxes) in cases:
        with torch.no_grad():
            got = loaded(images, mask)
        assert list(got) == ["pred_logits", "pred_boxes"]
        torch.testing.assert_close(got["pred_logits"], logits)
        torch.testing.assert_close(got["pred_boxes"], boxes)


def test_program_to_onnx_runs_any_size_and_batch(program, cases, tmp_path):
    """The route transformers' exporter takes: torch.export first, then ONNX."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx_program = torch.onnx.export(torch.export.load(program))
    assert not any("::" in op for op in op_types(onnx_program))
    path = tmp_path / "detector.onnx"
    onnx_program.save(str(path))
    check_onnx(path, cases)
