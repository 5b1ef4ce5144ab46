# RetinaNet + FPN with BiFormer-S on COCO, 1x schedule (official recipe):
# 12 epochs (steps 8 and 11) and 2 images/GPU x 8 GPUs come with the mmdet
# base; BiFormer changes the backbone, the FPN (inputs from stride 8,
# extra levels computed from the input of the last level) and the
# optimizer (AdamW lr 1e-4, weight decay 1e-4, mixed precision with a static
# loss scale of 512).
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']
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
        auto_pad=True,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(
        in_channels=[64, 128, 256, 512],
        start_level=1,
        add_extra_convs='on_input'))

optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale=512.,
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, weight_decay=1e-4))

# the stride-4 output (and its norm) is not used by the FPN (start_level=1)
find_unused_parameters = True
