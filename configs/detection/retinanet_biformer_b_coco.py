# RetinaNet + FPN with BiFormer-B on COCO, 1x schedule: the BiFormer-S
# recipe with the base arch and drop path 0.3.
_base_ = ['./retinanet_biformer_s_coco.py']

checkpoint_file = 'checkpoints/biformer_base_best.pth'

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint=checkpoint_file)),
    neck=dict(in_channels=[96, 192, 384, 768]))
