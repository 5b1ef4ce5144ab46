# BiFormer-T on ImageNet-1K, 224x224, 300 epochs (official recipe).
#
# mmpretrain's Swin-T ImageNet recipe is the DeiT/timm recipe BiFormer was
# trained with; inherit it and state what BiFormer changes:
#   AdamW, lr 5e-4 per 512 images (1e-3 for 8 GPUs x 128), weight decay 0.05
#   (none on norms, biases and other 1-D params), cosine to 1e-5 after 5
#   linear warm-up epochs from 1e-6, label smoothing 0.1, Mixup 0.8 /
#   CutMix 1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25,
#   bicubic resizing (test: resize 256, centre crop 224), repeated
#   augmentation and EMA 0.99996.
# Colour jitter 0.4 is part of the official command line, but timm ignores it
# whenever RandAugment is on, so there is no ColorJitter transform here.
_base_ = [
    'mmpretrain::_base_/models/swin_transformer/tiny_224.py',
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmbiformer'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='BiFormer',
        arch='tiny',
        n_win=7,
        out_indices=(3, ),  # one output, BatchNorm'ed as in the official head
        drop_path_rate=0.1),
    head=dict(in_channels=512))

# 8 GPUs x 128 images, repeated augmentation (3 repeats, as in DeiT)
train_dataloader = dict(
    batch_size=128, sampler=dict(type='RepeatAugSampler', shuffle=True))
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

# AdamW lr 1e-3 for 1024 images comes with the base (auto_scale_lr too);
# only the warm-up is shorter: 5 epochs from 1e-6.
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,  # 1e-6 / 1e-3
        by_epoch=True,
        end=5,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        T_max=295,
        eta_min=1e-5,
        by_epoch=True,
        begin=5,
        end=300)
]
train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)

# EMA of the weights with decay 0.99996 per iteration (momentum = 1 - decay)
custom_hooks = [dict(type='EMAHook', momentum=4e-5, priority='ABOVE_NORMAL')]
