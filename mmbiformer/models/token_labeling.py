"""Token labeling (Jiang et al., "All Tokens Matter: Token Labeling for
Training Better Vision Transformers", NeurIPS 2021) for mmpretrain: the
training of BiFormer-S* and BiFormer-B*.

Besides the image label, every token of the last stage learns the dense
soft label a teacher gave its location (the targets come from
:mod:`mmbiformer.datasets.token_label`):

* :class:`MixToken`: CutMix in the token space of the final stage, applied
  to the features right after the stem, so the mixed region is made of
  whole final-stage tokens;
* :class:`TokenLabelClsHead`: a class head on the pooled features plus an
  auxiliary linear head on every final-stage token; at test time the score
  is ``cls + 0.5 * max over tokens of aux``;
* :class:`TokenLabelLoss`: soft-target cross-entropy of the class output
  plus ``beta`` (0.5) times the mean soft-target cross-entropy of the
  tokens, with the original's label smoothing;
* :class:`TokenLabelClassifier`: mmpretrain's ``ImageClassifier`` that runs
  MixToken around the backbone during training.

Needs mmpretrain; :mod:`mmbiformer.registry` registers the classes in its
``MODELS``. The backbone is used as it is: MixToken is a forward hook on
its stem module (``downsample_layers.0`` for BiFormer).
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.models.heads import ClsHead
from mmpretrain.structures import DataSample

# --------------------------------------------------------------- MixToken


@dataclass
class TokenBox:
    """A box of whole final-stage tokens: rows ``[y1, y2)`` and columns
    ``[x1, x2)`` of a ``grid_h x grid_w`` token grid; ``lam`` is the share
    of the grid outside the box (the weight of each image's own label)."""
    x1: int
    y1: int
    x2: int
    y2: int
    grid_h: int
    grid_w: int

    @property
    def area(self) -> int:
        return (self.x2 - self.x1) * (self.y2 - self.y1)

    @property
    def lam(self) -> float:
        return 1. - self.area / (self.grid_h * self.grid_w)


def swap_in_box(x: torch.Tensor, box: TokenBox,
                stride: int = 1) -> torch.Tensor:
    """``x`` (N, C, H, W) with the box (in tokens, ``stride`` pixels of
    ``x`` per token) taken from the reversed batch (image ``i`` gets the
    box of image ``N - 1 - i``). Applying it twice gives ``x`` back."""
    h, w = x.shape[-2:]
    inside = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    inside[box.y1 * stride:min(box.y2 * stride, h),
           box.x1 * stride:min(box.x2 * stride, w)] = True
    return torch.where(inside, x.flip(0), x)


class MixToken:
    """MixToken: CutMix of features in the final stage's token space.

    One box per batch: ``lam ~ Beta(alpha, alpha)``, a box of ``sqrt(1 -
    lam)`` of each side of the token grid around a uniformly drawn token,
    clipped to the grid; the mixing weight is then recomputed from the
    clipped box (``lam = 1 - box area / grid area``). Image ``i`` gets the
    box's features of image ``N - 1 - i``.

    Args:
        alpha (float): Beta distribution parameter (1: lam uniform).
        token_stride (int): pixels of the mixed feature map per final-stage
            token: 8 for BiFormer mixed after its stem (stride 4 vs 32).
        prob (float): probability of mixing a batch at all.
    """

    def __init__(self,
                 alpha: float = 1.,
                 token_stride: int = 8,
                 prob: float = 1.) -> None:
        if alpha <= 0:
            raise ValueError(f'MixToken alpha must be > 0, got {alpha}')
        if not (isinstance(token_stride, int) and token_stride > 0):
            raise ValueError('MixToken token_stride must be a positive int, '
                             f'got {token_stride!r}')
        self.alpha = alpha
        self.token_stride = token_stride
        self.prob = prob

    def sample_box(self, grid_h: int, grid_w: int) -> TokenBox:
        """Draw a box on a ``grid_h x grid_w`` token grid (the torch RNG)."""
        if self.prob < 1 and float(torch.rand(())) >= self.prob:
            return TokenBox(0, 0, 0, 0, grid_h, grid_w)
        a = torch.tensor(float(self.alpha))
        lam = float(torch.distributions.Beta(a, a).sample())
        ratio = math.sqrt(1. - lam)
        cut_h, cut_w = int(grid_h * ratio), int(grid_w * ratio)
        cy = int(torch.randint(grid_h, ()))
        cx = int(torch.randint(grid_w, ()))
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, grid_h)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, grid_w)
        return TokenBox(x1, y1, x2, y2, grid_h, grid_w)

    @contextlib.contextmanager
    def after(self, module: nn.Module) -> Iterator[List[TokenBox]]:
        """Mix the output of ``module`` (N, C, H, W) while in the context.

        Yields a list that holds the drawn :class:`TokenBox` once the
        module has run (the token grid is ``ceil(H / token_stride) x
        ceil(W / token_stride)``).
        """
        boxes: List[TokenBox] = []

        def hook(_module, _inputs, out):
            s = self.token_stride
            box = self.sample_box(math.ceil(out.shape[-2] / s),
                                  math.ceil(out.shape[-1] / s))
            boxes.append(box)
            return swap_in_box(out, box, s) if box.area else out

        handle = module.register_forward_hook(hook)
        try:
            yield boxes
        finally:
            handle.remove()


# ------------------------------------------------------------------- loss


def soft_cross_entropy(score: torch.Tensor,
                       target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``sum(-target * log_softmax(score))``;
    ``score`` and ``target`` are (..., num_classes)."""
    loss = -(target * F.log_softmax(score, dim=-1)).sum(-1)
    return loss.mean()


class TokenLabelLoss(nn.Module):
    """``cls_weight * CE(cls, y_cls) + token_weight * mean_t CE(aux_t,
    y_t)`` with soft targets.

    Label smoothing as in the original: a target distribution ``p`` over
    ``K`` classes becomes ``p * (1 - s + s / K) + s / K`` (the teacher's
    soft labels included; they then sum to ``1 + s / K``, as there).

    Args:
        token_weight (float): ``beta``, the weight of the token loss (0.5 in
            LV-ViT's recipe).
        cls_weight (float): the weight of the class loss.
        label_smooth_val (float): ``s``. Defaults to 0.1.
    """

    def __init__(self,
                 token_weight: float = 0.5,
                 cls_weight: float = 1.,
                 label_smooth_val: float = 0.1) -> None:
        super().__init__()
        self.token_weight = token_weight
        self.cls_weight = cls_weight
        self.label_smooth_val = label_smooth_val

    def smooth(self, target: torch.Tensor) -> torch.Tensor:
        s = self.label_smooth_val
        if not s:
            return target
        off = s / target.shape[-1]
        return target * (1. - s + off) + off

    def forward(self, cls_score: torch.Tensor, token_score: torch.Tensor,
                cls_target: torch.Tensor,
                token_target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            cls_score: (N, K) class logits.
            token_score: (N, L, K) logits of the L tokens.
            cls_target: (N, K) image-level distribution (already mixed).
            token_target: (N, L, K) each token's distribution.

        Returns:
            dict: ``loss_cls`` and ``loss_token``, weighted.
        """
        if token_score.shape != token_target.shape:
            raise ValueError(
                f'token scores {tuple(token_score.shape)} and token labels '
                f'{tuple(token_target.shape)} differ in shape (N, tokens, '
                'classes)')
        return dict(
            loss_cls=self.cls_weight *
            soft_cross_entropy(cls_score, self.smooth(cls_target)),
            loss_token=self.token_weight *
            soft_cross_entropy(token_score, self.smooth(token_target)))


# ------------------------------------------------------------------- head


class TokenLabelClsHead(ClsHead):
    """Class head on the pooled features plus an auxiliary linear head on
    every token of the last stage.

    Input: the backbone's outputs (the last one, (N, C, h, w), is used; no
    neck). Training: ``fc(mean over tokens)`` (N, K) and ``aux_fc`` of each
    token (N, h, w, K) against the image target (``gt_score`` if the data
    samples have it, e.g. the teacher's label of the crop written by
    ``ResampleTokenLabel``, else the one-hot ``gt_label``) and the token
    targets ``gt_token_label`` (K, h, w). Test: ``cls + aux_test_weight *
    max over tokens of aux``.

    Args:
        num_classes (int): classes.
        in_channels (int): channels of the last stage.
        loss (dict | nn.Module, optional): the loss; None:
            :class:`TokenLabelLoss` (beta 0.5, label smoothing 0.1).
        aux_test_weight (float): weight of the token maximum at test time
            (0.5 as in LV-ViT).
        topk (int | tuple): top-k of the accuracy metric, as ``ClsHead``.
        init_cfg (dict, optional): None: truncated normal (std 0.02) Linear
            weights and zero biases, as the official head.
    """

    def __init__(self,
                 num_classes: int,
                 in_channels: int,
                 loss: Optional[dict] = None,
                 aux_test_weight: float = .5,
                 topk: Sequence[int] = (1, ),
                 init_cfg: Optional[dict] = None):
        loss = loss if loss is not None else dict(type='TokenLabelLoss')
        init_cfg = init_cfg or dict(
            type='TruncNormal', layer='Linear', std=.02, bias=0.)
        super().__init__(loss=loss, topk=topk, cal_acc=False,
                         init_cfg=init_cfg)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.aux_test_weight = aux_test_weight
        self.fc = nn.Linear(in_channels, num_classes)
        self.aux_fc = nn.Linear(in_channels, num_classes)

    def pre_logits(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        """The last stage's map, (N, C, h, w)."""
        return feats[-1]

    def scores(self, feats: Tuple[torch.Tensor]
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Class logits (N, K) and token logits (N, h, w, K)."""
        x = self.pre_logits(feats)
        cls_score = self.fc(x.mean(dim=(2, 3)))
        token_score = self.aux_fc(x.permute(0, 2, 3, 1))
        return cls_score, token_score

    def forward(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        """The test-time score (N, K): ``cls + w * max_tokens aux``."""
        cls_score, token_score = self.scores(feats)
        return cls_score + self.aux_test_weight * token_score.flatten(
            1, 2).amax(dim=1)

    def _image_target(self, data_samples: List[DataSample],
                      like: torch.Tensor) -> torch.Tensor:
        if 'gt_score' in data_samples[0]:
            target = torch.stack([s.gt_score for s in data_samples])
        else:
            labels = torch.cat([s.gt_label for s in data_samples])
            target = F.one_hot(labels.long(), self.num_classes)
        return target.to(like)

    def loss(self,
             feats: Tuple[torch.Tensor],
             data_samples: List[DataSample],
             mix_box: Optional[TokenBox] = None) -> dict:
        """Losses of a batch; ``mix_box`` is the MixToken box of the batch
        (None: not mixed)."""
        cls_score, token_score = self.scores(feats)
        if 'gt_token_label' not in data_samples[0]:
            raise KeyError(
                'TokenLabelClsHead needs gt_token_label in the data samples: '
                "add LoadTokenLabel ... ResampleTokenLabel to the training "
                "pipeline and PackInputs(algorithm_keys=['gt_token_label'])")
        token_target = torch.stack(
            [s.gt_token_label for s in data_samples]).to(token_score)
        n, h, w, k = token_score.shape
        if token_target.shape[-2:] != (h, w):
            raise ValueError(
                f'The token labels are {token_target.shape[-2]}x'
                f'{token_target.shape[-1]} but the backbone gives {h}x{w} '
                'tokens; set ResampleTokenLabel(output_size=...) to the '
                'training input size / 32')
        image_target = self._image_target(data_samples, cls_score)
        if mix_box is not None and mix_box.area:
            # each token is scored against its own image's label: swap the
            # outputs of the box back; the image label is mixed by area
            token_score = swap_in_box(
                token_score.permute(0, 3, 1, 2), mix_box).permute(0, 2, 3, 1)
            lam = mix_box.lam
            image_target = lam * image_target + \
                (1. - lam) * image_target.flip(0)
        return self.loss_module(
            cls_score, token_score.reshape(n, h * w, k), image_target,
            token_target.flatten(2).transpose(1, 2))


# ------------------------------------------------------------- classifier


class TokenLabelClassifier(ImageClassifier):
    """mmpretrain's ``ImageClassifier`` trained with token labeling.

    Training runs the backbone with :class:`MixToken` applied to the output
    of its stem (``stem``, a submodule name of the backbone) and hands the
    box to the head's loss; prediction is the ``ImageClassifier``'s.

    Args:
        mix_token (bool | dict): :class:`MixToken` arguments (``alpha``,
            ``token_stride``, ``prob``); True: the defaults (alpha 1,
            token_stride 8 for BiFormer); False or None: no MixToken.
        stem (str): the backbone submodule whose output is mixed.
        Others: as ``ImageClassifier`` (use no neck: the head pools).
    """

    def __init__(self,
                 backbone: dict,
                 head: dict,
                 neck: Optional[dict] = None,
                 mix_token: Union[bool, dict, None] = True,
                 stem: str = 'downsample_layers.0',
                 train_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(backbone=backbone, neck=neck, head=head,
                         train_cfg=train_cfg,
                         data_preprocessor=data_preprocessor,
                         init_cfg=init_cfg)
        if mix_token is True:
            self.mix_token: Optional[MixToken] = MixToken()
        elif mix_token:
            self.mix_token = MixToken(**mix_token)
        else:
            self.mix_token = None
        self.stem = stem
        self.backbone.get_submodule(stem)  # fail early on a wrong name

    def loss(self, inputs: torch.Tensor,
             data_samples: List[DataSample]) -> dict:
        if self.mix_token is None:
            return self.head.loss(self.extract_feat(inputs), data_samples)
        with self.mix_token.after(self.backbone.get_submodule(
                self.stem)) as boxes:
            feats = self.extract_feat(inputs)
        return self.head.loss(feats, data_samples, mix_box=boxes[0])


#: name -> class, registered into mmpretrain's MODELS by
#: :mod:`mmbiformer.registry`
MODELS: Dict[str, type] = {
    'TokenLabelClassifier': TokenLabelClassifier,
    'TokenLabelClsHead': TokenLabelClsHead,
    'TokenLabelLoss': TokenLabelLoss,
}
