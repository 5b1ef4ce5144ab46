# UperNet with BiFormer-S on ADE20K, 512x512 crops, 160k iterations
# (official recipe). Data pipeline, heads (150 classes) and the 160k
# iteration loop come with the mmseg base; BiFormer changes the backbone,
# the head inputs, the batch (2 images/GPU x 8 GPUs) and the optimization:
# AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01 with none on norm
# layers, poly decay (power 1) after 1500 linear warm-up iterations from
# 1e-6 x lr, mixed precision.
_base_ = ['mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py']
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
        n_win=8,  # 512 / 4 / 8 = 16 tokens per region side at stage 1
        auto_pad=True,  # whole-image inference at any size
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))

train_dataloader = dict(batch_size=2)

# Mixed precision; the official runs used a static loss scale of 512.
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale=512.,
    optimizer=dict(
        type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(norm_decay_mult=0.))

param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0,
        end=1500),
    dict(
        type='PolyLR',
        power=1.0,
        eta_min=0.0,
        by_epoch=False,
        begin=1500,
        end=160000),
]
