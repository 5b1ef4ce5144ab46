# BiFormer-S* on ImageNet-1K: BiFormer-S trained with token labeling
# (Jiang et al., "All Tokens Matter: Token Labeling for Training Better
# Vision Transformers", NeurIPS 2021), the paper's 84.3 top-1 row.
#
# The BiFormer authors never released this recipe. It is the BiFormer-S
# recipe (300 epochs at 224, AdamW lr 1e-3 per 1024 images, weight decay
# 0.05, cosine with 5 warm-up epochs, drop path 0.15, RandAugment m9
# mstd0.5, random erasing 0.25, repeated augmentation, EMA; see
# biformer_t_in1k.py) with what token labeling changes, as in LV-ViT:
#   * every training image has a dense label map of a teacher: the released
#     NFNet-F6 (576 px) files, or files written by
#     tools/dataset_converters/make_token_labels.py, under token_label_root
#     (<root>/<wnid>/<image stem>.pt, float16 [2, 5, H, W]);
#   * MixToken (a CutMix box of whole final-stage tokens, lambda ~ Beta(1, 1),
#     mixed after the stem) replaces Mixup and CutMix;
#   * the class head learns the teacher's label of the crop, each of the
#     7x7 final-stage tokens its own label: loss = CE(cls) + 0.5 * mean token
#     CE, label smoothing 0.1 (as LV-ViT); test score = cls + 0.5 * max over
#     tokens of the token head.
# The label map follows the image: the random resized crop records its box
# and the flip flips the map; the map is RoI-aligned to the 7x7 grid at the
# end. RandAugment keeps the 10 photometric operations of 'timm_increasing'
# (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd,
# ColorTransform, Contrast, Brightness, Sharpness) and leaves out the 5
# geometric ones (Rotate, Shear x/y, Translate x/y), which would move the
# image but not its label map. Random erasing changes no geometry: kept.
#
# To use other label files, set token_label_root here, or
# --cfg-options train_dataloader.dataset.pipeline.1.label_root=DIR
_base_ = ['./biformer_s_in1k.py']

token_label_root = 'data/imagenet/label_top5_train_nfnet'
num_classes = 1000
token_grid = 7  # 224 / 32: BiFormer's final stage

model = dict(
    type='TokenLabelClassifier',
    mix_token=dict(alpha=1.0, token_stride=8),  # stem stride 4, last 32
    neck=None,  # the head pools (and keeps the tokens for its token head)
    head=dict(
        _delete_=True,
        type='TokenLabelClsHead',
        num_classes=num_classes,
        in_channels=512,
        aux_test_weight=0.5,
        loss=dict(
            type='TokenLabelLoss', token_weight=0.5, label_smooth_val=0.1)),
    train_cfg=None)  # no Mixup / CutMix: MixToken instead

bgr_mean = [103.53, 116.28, 123.675]
bgr_std = [57.375, 57.12, 58.395]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='LoadTokenLabel',
        label_root=token_label_root,
        num_classes=num_classes,
        topk=5),
    dict(
        type='TokenLabelRandomResizedCrop',
        scale=224,
        backend='pillow',
        interpolation='bicubic'),
    dict(type='TokenLabelRandomFlip', prob=0.5, direction='horizontal'),
    dict(
        type='RandAugment',
        policies=[  # photometric only (see above)
            dict(type='AutoContrast'),
            dict(type='Equalize'),
            dict(type='Invert'),
            dict(type='Posterize', magnitude_range=(4, 0)),
            dict(type='Solarize', magnitude_range=(256, 0)),
            dict(type='SolarizeAdd', magnitude_range=(0, 110)),
            dict(type='ColorTransform', magnitude_range=(0, 0.9)),
            dict(type='Contrast', magnitude_range=(0, 0.9)),
            dict(type='Brightness', magnitude_range=(0, 0.9)),
            dict(type='Sharpness', magnitude_range=(0, 0.9)),
        ],
        num_policies=2,
        total_level=10,
        magnitude_level=9,
        magnitude_std=0.5,
        hparams=dict(pad_val=[round(x) for x in bgr_mean],
                     interpolation='bicubic')),
    dict(
        type='RandomErasing',
        erase_prob=0.25,
        mode='rand',
        min_area_ratio=0.02,
        max_area_ratio=1 / 3,
        fill_color=bgr_mean,
        fill_std=bgr_std),
    dict(
        type='ResampleTokenLabel',
        num_classes=num_classes,
        output_size=token_grid),
    dict(type='PackInputs', algorithm_keys=['gt_token_label']),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
