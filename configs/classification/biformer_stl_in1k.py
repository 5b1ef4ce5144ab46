# BiFormer-STL on ImageNet-1K: the official ablation model (Swin-T layout,
# bi-level routing attention in place of (shifted) window attention) with
# the BiFormer-T recipe, as the official command line: 8 GPUs x 128 images,
# lr 5e-4 per 512, drop path 0.1.
_base_ = ['./biformer_t_in1k.py']

model = dict(
    backbone=dict(arch='stl', drop_path_rate=0.1),
    head=dict(in_channels=768))
