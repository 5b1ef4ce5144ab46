# BiFormer-B* on ImageNet-1K: BiFormer-B trained with token labeling, the
# paper's 85.4 top-1 row. The recipe of biformer_s_tl_in1k.py (token labels
# under token_label_root there, MixToken, beta 0.5, photometric-only
# RandAugment) with the base arch and its drop path (0.4, UNCONFIRMED as in
# biformer_b_in1k.py).
_base_ = ['./biformer_s_tl_in1k.py']

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.4),
    head=dict(in_channels=768))
