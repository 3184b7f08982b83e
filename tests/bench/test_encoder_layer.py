"""The encoder-layer benchmark compares two layers that compute the same thing."""

from __future__ import annotations

import pytest
import torch

from msdeformattn.bench import encoder_layer

pytest.importorskip("transformers")

LEVELS = ((8, 12), (4, 6), (2, 3), (1, 2))


def test_our_layer_gets_transformers_weights_and_output():
    # encoder_layer_step raises if the two layers' outputs differ.
    ours = encoder_layer.encoder_layer_step("msdeformattn", LEVELS)
    hf = encoder_layer.encoder_layer_step("transformers", LEVELS)
    ours()
    hf()


def test_weights_that_do_not_match_are_caught(monkeypatch):
    real = encoder_layer._copy_weights

    def off_by_a_bit(hf, ours):
        real(hf, ours)
        with torch.no_grad():  # every sample half a pixel off
            ours.self_attn.sampling_offsets.bias.add_(0.5)

    monkeypatch.setattr(encoder_layer, "_copy_weights", off_by_a_bit)
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        encoder_layer.encoder_layer_step("msdeformattn", LEVELS)
