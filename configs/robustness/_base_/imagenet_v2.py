# ImageNet-V2 test data for any ImageNet classifier of this project: the
# keys are prefixed so that a config can inherit them beside a model config
# (see ../imagenet-v2_biformer_s.py). Data: the three released variants
# extracted under data/imagenet-v2/ (imagenetv2-<variant>-format-val/0..999).
imagenet_v2_test_dataloader = dict(
    batch_size=128,
    num_workers=5,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        _delete_=True,
        type='ImageNetV2',
        data_root='data/imagenet-v2',
        variant='matched-frequency',  # or 'threshold0.7', 'top-images'
        # the ImageNet test pipeline (resize 256 bicubic, centre crop 224)
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='ResizeEdge', scale=256, edge='short',
                 backend='pillow', interpolation='bicubic'),
            dict(type='CenterCrop', crop_size=224),
            dict(type='PackInputs'),
        ]))
imagenet_v2_test_evaluator = dict(_delete_=True, type='Accuracy', topk=(1, 5))
