# Semantic FPN with BiFormer-S on ADE20K, 512x512 crops, 80k iterations on
# 8 GPUs x 2 images (official recipe). Data pipeline and the FPN head (150
# classes) come with the mmseg base; BiFormer changes the backbone, the FPN
# inputs, the schedule and the optimization: AdamW lr 2e-4, weight decay
# 1e-4, cosine decay (to 1e-8 x lr) after 1000 linear warm-up iterations
# from 0.1 x lr, mixed precision.
_base_ = ['mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py']
custom_imports = dict(imports=['mmbiformer'], allow_failed_imports=False)

# the official ImageNet-1K weights of BiFormer-S, downloaded once to
# <torch hub dir>/checkpoints/biformer_s_in1k_official.pth (put the file
# there by hand without network access) and converted on load; a
# local file: --cfg-options model.backbone.init_cfg.checkpoint=PATH
checkpoint_file = (
    'https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content')

model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='BiFormer',
        arch='small',
        n_win=8,
        auto_pad=True,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.15,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[64, 128, 256, 512]))

train_dataloader = dict(batch_size=2)

# Mixed precision; the official runs used a static loss scale of 512.
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale=512.,
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4))

param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
        end=1000),
    dict(
        type='CosineAnnealingLR',
        T_max=79000,
        eta_min_ratio=1e-8,
        by_epoch=False,
        begin=1000,
        end=80000),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=80000,
                 val_interval=8000)
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=8000))
