# Mask R-CNN + FPN with BiFormer-S on COCO, 1x schedule (official recipe):
# 12 epochs with steps at 8 and 11 and 2 images/GPU x 8 GPUs come with the
# mmdet base; BiFormer changes the backbone, the FPN inputs and the
# optimizer (AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05 with none
# on norm layers, mixed precision).
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['mmbiformer'], allow_failed_imports=False)

# the official ImageNet-1K weights of BiFormer-S, downloaded once to
# <torch hub dir>/checkpoints/biformer_s_in1k_official.pth (put the file
# there by hand without network access) and converted on load; a
# local file: --cfg-options model.backbone.init_cfg.checkpoint=PATH
checkpoint_file = (
    'https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content')

model = dict(
    backbone=dict(
        _delete_=True,
        type='BiFormer',
        arch='small',
        n_win=16,
        auto_pad=True,  # any input size (whole images at test time)
        out_indices=(0, 1, 2, 3),  # LayerNorm'ed outputs at strides 4..32
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[64, 128, 256, 512]))

# Mixed precision. The official runs used fp16=dict(), i.e. mmcv's
# Fp16OptimizerHook with its default static loss scale of 512.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale=512.,
    optimizer=dict(
        _delete_=True,
        type='AdamW',
        lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.))
