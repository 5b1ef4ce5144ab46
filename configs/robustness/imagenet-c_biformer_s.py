# BiFormer-S on ImageNet-C: top-1 error per corruption and severity, CE per
# corruption (AlexNet = 100), mCE over the 15 benchmark corruptions and the
# 4 extra ones apart:
#   python tools/test.py configs/robustness/imagenet-c_biformer_s.py \
#       'https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content'
# Another classifier: copy this file and change the first _base_ entry.
_base_ = [
    '../classification/biformer_s_in1k.py',
    './_base_/imagenet_c.py',
]
test_dataloader = {{_base_.imagenet_c_test_dataloader}}
test_evaluator = {{_base_.imagenet_c_test_evaluator}}
