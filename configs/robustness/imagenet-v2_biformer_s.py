# BiFormer-S on ImageNet-V2 (the test set only; no training data needed):
#   python tools/test.py configs/robustness/imagenet-v2_biformer_s.py \
#       'https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content'
# Other variants: --cfg-options test_dataloader.dataset.variant=threshold0.7
# (or top-images). Another classifier: copy this file and change the first
# _base_ entry to its config (e.g. ../classification/biformer_stl_in1k.py).
_base_ = [
    '../classification/biformer_s_in1k.py',
    './_base_/imagenet_v2.py',
]
test_dataloader = {{_base_.imagenet_v2_test_dataloader}}
test_evaluator = {{_base_.imagenet_v2_test_evaluator}}
