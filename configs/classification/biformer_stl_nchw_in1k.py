# BiFormer-STL-nchw on ImageNet-1K: BiFormer-STL with the refactored
# official operator's rules (pad_mode='after_qkv', the arch's default; they
# differ from BiFormer-STL's only at sizes that n_win does not divide, which
# the official operator always pads: auto_pad=True) and the LePE of v in the
# last stage; the BiFormer-T recipe with drop path 0.1.
_base_ = ['./biformer_t_in1k.py']

model = dict(
    backbone=dict(arch='stl_nchw', drop_path_rate=0.1, auto_pad=True),
    head=dict(in_channels=768))
