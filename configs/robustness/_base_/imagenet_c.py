# ImageNet-C test data and the mCE metric for any ImageNet classifier of
# this project (prefixed keys, see ../imagenet-c_biformer_s.py). Data: the
# release extracted under data/imagenet-c/<corruption>/<severity>/<wnid>/.
# The images are 224x224 already (resized and centre-cropped before the
# corruption), so the pipeline only loads and packs them, keeping the
# corruption and severity for the metric.
imagenet_c_test_dataloader = dict(
    batch_size=128,
    num_workers=5,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        _delete_=True,
        type='ImageNetC',
        data_root='data/imagenet-c',
        corruptions='all',  # the 15 of the mCE + the 4 extras if present
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='ResizeEdge', scale=224, edge='short',
                 backend='pillow', interpolation='bicubic'),
            dict(type='CenterCrop', crop_size=224),
            dict(type='PackInputs',
                 meta_keys=('sample_idx', 'img_path', 'ori_shape',
                            'img_shape', 'corruption', 'severity')),
        ]))
imagenet_c_test_evaluator = dict(_delete_=True, type='ImageNetCMetric')
