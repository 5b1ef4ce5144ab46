# UperNet with BiFormer-B on ADE20K, 512x512, 160k iterations: the BiFormer-S
# recipe with the base arch and drop path 0.4.
_base_ = ['./upernet_biformer_s_ade20k.py']

checkpoint_file = 'checkpoints/biformer_base_best.pth'

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.4,
        init_cfg=dict(checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
