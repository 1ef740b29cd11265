"""Export a segmentor's upstream deploy pair with mmdeploy and compare onnxruntime with PyTorch.

Usage::

    python tools/mmdeploy_check.py OUT_DIR                   # OUT_DIR has the deploy pair
    python tools/mmdeploy_check.py OUT_DIR --make-demo-pair  # writes the demo PSPNet's first

``OUT_DIR`` holds ``deploy_config.py`` + ``deploy.pth`` of an mmseg model in the upstream form
(as FoldHook or ``tools/fold.py`` write them). This process never imports mmreparam (checked
at the end): mmdeploy 1.3.1 exports ``OUT_DIR/end2end.onnx`` (static 96x96 input; with PSPNet
the 12x12 features are divided by its pooling scales 1, 2, 3, 6, so mmdeploy's avg-pool
rewrite of the adaptive pooling is exact), then onnxruntime and the PyTorch model (built by
mmdeploy from the same pair) run one image; the largest relative difference of the logits
and the share of pixels with the same class are printed.

``--make-demo-pair`` first writes, in a separate process, the upstream pair of
``configs/demo/pspnet_orepa-r50-d8_200i_synthetic.py`` at 1/8 width with random weights
(random BN statistics and OREPA branch scales, folded).

mmdeploy 1.3.1 calls ``torch.onnx.export`` without ``dynamo``; on torch >= 2.9 that means the
dynamo exporter, which mmdeploy's rewriters do not support: this tool passes
``dynamo=False`` (the TorchScript exporter).
"""
import argparse
import functools
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAKE_DEMO_PAIR = '''
import sys
from mmengine.config import Config
import mmreparam
from mmreparam.apis.deploy import export_deploy
from mmreparam.cli.model import build_model
from mmreparam.testing import randomize_bn, randomize_parameters
root, out = sys.argv[1:3]
cfg = Config.fromfile(f'{root}/configs/demo/pspnet_orepa-r50-d8_200i_synthetic.py')
cfg.model.backbone.base_channels = 8
cfg.model.decode_head.update(in_channels=256, channels=16)
cfg.model.auxiliary_head.update(in_channels=128, channels=8)
model = build_model(cfg)
randomize_parameters(model, ('vector', 'idconv1.weight'), seed=1)
randomize_bn(model, seed=2).eval()
paths = export_deploy(mmreparam.fold(model), cfg, out)
assert paths['form'] == 'upstream', paths['why']
'''


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', help='folder with deploy_config.py and deploy.pth')
    parser.add_argument('--make-demo-pair', action='store_true',
                        help='first write the demo PSPNet pair (1/8 width, random weights)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Export, run both, print the comparison; 1 with one message on failure."""
    args = parse_args(argv)
    if args.make_demo_pair:
        subprocess.run([sys.executable, '-c', MAKE_DEMO_PAIR, ROOT, args.out_dir], check=True)
    for name in ('deploy_config.py', 'deploy.pth'):
        if not os.path.isfile(os.path.join(args.out_dir, name)):
            print(f'error: {args.out_dir!r} has no {name}', file=sys.stderr)
            return 1
    import torch
    torch.onnx.export = functools.partial(torch.onnx.export, dynamo=False)
    import onnxruntime as ort
    from mmdeploy.apis import torch2onnx
    from mmdeploy.apis.utils import build_task_processor
    from mmengine.config import Config

    work = args.out_dir
    deploy_cfg = Config(dict(
        onnx_config=dict(type='onnx', export_params=True, keep_initializers_as_inputs=False,
                         opset_version=11, save_file='end2end.onnx', input_names=['input'],
                         output_names=['output'], input_shape=[96, 96], optimize=True),
        codebase_config=dict(type='mmseg', task='Segmentation', with_argmax=False),
        backend_config=dict(type='onnxruntime')))
    img = np.random.RandomState(0).randint(0, 255, (96, 96, 3)).astype(np.uint8)
    config, checkpoint = os.path.join(work, 'deploy_config.py'), os.path.join(work, 'deploy.pth')
    torch2onnx(img, work, 'end2end.onnx', deploy_cfg, config, checkpoint, device='cpu')
    task = build_task_processor(Config.fromfile(config), deploy_cfg, 'cpu')
    model = task.build_pytorch_model(checkpoint)
    data, _ = task.create_input(img, input_shape=[96, 96])
    with torch.no_grad():
        ref = model.test_step(data)[0].seg_logits.data.numpy()
    batch = model.data_preprocessor(data, False)['inputs']
    session = ort.InferenceSession(os.path.join(work, 'end2end.onnx'),
                                   providers=['CPUExecutionProvider'])
    out = session.run(None, {'input': batch.numpy()})[0].reshape(ref.shape)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    same = (out.argmax(0) == ref.argmax(0)).mean()
    loaded = sorted(m for m in sys.modules if m == 'mmreparam' or m.startswith('mmreparam.'))
    print(f'mmdeploy {__import__("mmdeploy").__version__}, torch {torch.__version__}: wrote '
          f'{work}/end2end.onnx; onnxruntime vs PyTorch: logits max rel error {rel:.2g}, '
          f'{100 * same:.2f}% of pixels with the same class; mmreparam modules loaded: '
          f'{loaded or "none"}')
    return 1 if loaded else 0


if __name__ == '__main__':
    sys.exit(main())
