"""``build``: the model, the criterion and the post-processor of a run, from its configs."""

from __future__ import annotations

from torch import nn

from ..models.deformable_detr import DeformableDETR, DeformableDETRConfig, build_model
from ..models.postprocess import PostProcess
from .config import TrainConfig
from .losses import SetCriterion, aux_weights
from .matcher import HungarianMatcher

__all__ = ["build", "build_criterion"]


def build_criterion(model_config: DeformableDETRConfig, cfg: TrainConfig) -> SetCriterion:
    """The set criterion with the config's matching costs and loss weights, one weight per
    output the model makes (final, auxiliary decoder layers, two-stage proposals)."""
    matcher = HungarianMatcher(
        cost_class=cfg.set_cost_class,
        cost_bbox=cfg.set_cost_bbox,
        cost_giou=cfg.set_cost_giou,
        alpha=cfg.focal_alpha,
    )
    base = {
        "loss_ce": cfg.cls_loss_coef,
        "loss_bbox": cfg.bbox_loss_coef,
        "loss_giou": cfg.giou_loss_coef,
    }
    num_aux = model_config.dec_layers - 1 if model_config.aux_loss else 0
    weights = aux_weights(base, num_aux, two_stage=model_config.two_stage)
    return SetCriterion(model_config.num_classes, matcher, weights, cfg.focal_alpha)


def build(
    model_config: DeformableDETRConfig, cfg: TrainConfig, model: DeformableDETR | None = None
) -> tuple[DeformableDETR, SetCriterion, nn.Module]:
    """(model, criterion, post-processor); ``model``: use these weights instead of fresh ones."""
    if model is None:
        model = build_model(model_config)
    return model, build_criterion(model_config, cfg), PostProcess()
