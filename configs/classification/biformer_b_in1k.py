# BiFormer-B on ImageNet-1K: the BiFormer-T recipe with the base arch
# (widths 96/192/384/768).
_base_ = ['./biformer_t_in1k.py']

# UNCONFIRMED: the released training scripts give no drop path rate for
# BiFormer-B; 0.4 is our choice (the T -> S trend and comparable models).
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.4),
    head=dict(in_channels=768))
