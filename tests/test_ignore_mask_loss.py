"""MODEL.MASK_FORMER.IGNORE_IN_MASK_LOSS: ignored pixels (pseudo-label pixels below the threshold,
void classes, padding) left out of the mask losses and matching costs; off = official behaviour."""

import torch
from detectron2.modeling import build_model
from detectron2.structures import ImageList, Instances

from mask2former.engine import get_project_cfg
from mask2former.modeling.criterion import SetCriterion, dice_loss, sigmoid_ce_loss
from mask2former.modeling.matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost

TINY = "configs/tiny/m2f_swin_tiny_cpu.yaml"


def test_weighted_costs_and_losses_equal_the_unweighted_ones_on_the_kept_points():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(5, 40, generator=g, dtype=torch.float64)
    targets = (torch.rand(3, 40, generator=g) > 0.5).double()
    keep = torch.rand(40, generator=g) > 0.4
    weights = keep.double()
    for fn in (batch_sigmoid_ce_cost, batch_dice_cost):
        torch.testing.assert_close(
            fn(inputs, targets, torch.ones(40, dtype=torch.float64)), fn(inputs, targets)
        )
        torch.testing.assert_close(
            fn(inputs, targets, weights), fn(inputs[:, keep], targets[:, keep])
        )
    pair_targets = torch.cat([targets, targets[:2]])  # [5, 40], one target per prediction
    w = weights.expand(5, -1)
    for fn in (sigmoid_ce_loss, dice_loss):
        torch.testing.assert_close(
            fn(inputs, pair_targets, 2.0, w), fn(inputs[:, keep], pair_targets[:, keep], 2.0)
        )
    # a mask whose points are all ignored contributes nothing
    zero_w = w.clone()
    zero_w[0] = 0
    full = sigmoid_ce_loss(inputs, pair_targets, 1.0, zero_w)
    rest = sigmoid_ce_loss(inputs[1:, keep], pair_targets[1:, keep], 1.0)
    torch.testing.assert_close(full, rest)


def _criterion(num_points=200):
    matcher = HungarianMatcher(cost_class=1, cost_mask=5, cost_dice=5, num_points=num_points)
    return SetCriterion(
        2,
        matcher,
        {"loss_ce": 1, "loss_mask": 5, "loss_dice": 5},
        0.1,
        ["labels", "masks"],
        num_points,
        3.0,
        0.75,
    )


def test_no_gradient_reaches_predictions_inside_ignored_regions():
    torch.manual_seed(0)
    pred_masks = torch.randn(1, 4, 16, 16, requires_grad=True)
    outputs = {"pred_logits": torch.randn(1, 4, 3), "pred_masks": pred_masks}
    masks = torch.zeros(2, 64, 64)
    masks[0, 10:40, 40:60] = 1
    masks[1, 40:60, 5:60] = 1
    valid = torch.ones(64, 64)
    valid[:, :24] = 0  # left part ignored (24 px = 6 prediction pixels)
    targets = [{"labels": torch.tensor([0, 1]), "masks": masks, "valid": valid}]
    losses = _criterion()(outputs, targets)
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    grad = pred_masks.grad[0]
    assert grad[:, :, :4].abs().max() == 0  # prediction pixels whose footprint is all ignored
    assert grad[:, :, 8:].abs().sum() > 0

    pred_masks.grad = None
    del targets[0]["valid"]  # official behaviour: ignored pixels are negatives
    losses = _criterion()(outputs, targets)
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    assert pred_masks.grad[0][:, :, :4].abs().sum() > 0


def _tiny_model(ignore: bool):
    cfg = get_project_cfg()
    cfg.merge_from_file(TINY)
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 1
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 2
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 256
    cfg.MODEL.MASK_FORMER.IGNORE_IN_MASK_LOSS = ignore
    torch.manual_seed(0)
    return build_model(cfg)


def test_meta_arch_builds_validity_maps_from_sem_seg():
    model = _tiny_model(ignore=True)
    assert (
        model.mask_loss_ignore_value == 255
        and _tiny_model(ignore=False).mask_loss_ignore_value is None
    )
    sem_seg = torch.tensor([[0, 1, 255], [255, 1, 1]])
    instances = Instances((2, 3))
    instances.gt_classes = torch.tensor([0, 1])
    instances.gt_masks = torch.stack([sem_seg == 0, sem_seg == 1])
    images = ImageList(torch.zeros(1, 3, 4, 5), [(2, 3)])
    (target,) = model.prepare_targets([instances], images, [sem_seg])
    expected = torch.zeros(4, 5)
    expected[:2, :3] = torch.tensor([[1.0, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(target["valid"], expected)
    assert target["masks"].shape == (2, 4, 5)


def test_training_step_with_ignored_pixels():
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    sem_seg = torch.zeros(64, 64, dtype=torch.long)
    sem_seg[10:30, 10:40] = 3
    sem_seg[:, 48:] = 255
    instances = Instances((64, 64))
    instances.gt_classes = torch.tensor([0, 3])
    instances.gt_masks = torch.stack([sem_seg == 0, sem_seg == 3])
    batch = [{"image": image, "sem_seg": sem_seg, "instances": instances}]
    losses = {}
    for ignore in (False, True):
        model = _tiny_model(ignore).train()
        torch.manual_seed(1)
        losses[ignore] = model(batch)
        total = sum(losses[ignore].values())
        assert torch.isfinite(total)
        total.backward()
    # same weights and random draws: the ignored columns change the mask terms
    assert losses[True]["loss_mask"] != losses[False]["loss_mask"]
