# BiFormer-S on ImageNet-1K: the BiFormer-T recipe with the small arch and
# drop path 0.15.
_base_ = ['./biformer_t_in1k.py']

model = dict(backbone=dict(arch='small', drop_path_rate=0.15))
