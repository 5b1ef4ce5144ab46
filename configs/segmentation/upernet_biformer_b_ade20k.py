# UperNet with BiFormer-B on ADE20K, 512x512, 160k iterations: the BiFormer-S
# recipe with the base arch and drop path 0.4.
_base_ = ['./upernet_biformer_s_ade20k.py']

# the official ImageNet-1K weights of BiFormer-B, downloaded once to
# <torch hub dir>/checkpoints/biformer_b_in1k_official.pth (put the file
# there by hand without network access) and converted on load; a
# local file: --cfg-options model.backbone.init_cfg.checkpoint=PATH
checkpoint_file = (
    'https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHI_XPhoadjaNxtO/root/content')

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.4,
        init_cfg=dict(checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
