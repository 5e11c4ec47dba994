#!/usr/bin/env python
"""The README's routing figure: a recycled V-JetMoE, briefly fine-tuned, looked at with `inspect_routing`.

Uses a Fashion-MNIST predecessor like the demo's but with patch 4 (an 8x8 token grid draws finer maps than the
demo's 4x4), pretrained here on first use and cached, recycles it into a V-JetMoE by importance sampling,
fine-tunes it for one epoch on MNIST-5k and draws the dispatch maps and contributions of four test digits.

    python scripts/make_inspect_figure.py --out docs/inspect_example
"""
import argparse

import timm
import torch

from jetmoe_timm.tools.demo import PRED_ARGS, SUCC_ARGS, load_demo_split, pretrained_predecessor, train
from jetmoe_timm.recycle import recycle
from jetmoe_timm.tools.visualize import inspect_routing, save_inspection

# the setup the committed figure was made with: 64 patch tokens, N/2 = 32 core and N = 64 universal experts
FIGURE_PRED_ARGS = dict(PRED_ARGS, patch_size=4)
FIGURE_SUCC_ARGS = dict(SUCC_ARGS, patch_size=4, num_core_experts=32, num_univ_experts=64)
FIGURE_CFG = dict(pretrain_images=20000, pretrain_epochs=2, lr=1e-3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='docs/inspect_example')
    parser.add_argument('--epochs', type=int, default=1)
    args = parser.parse_args(argv)
    cfg = FIGURE_CFG
    fm = (*load_demo_split('fashion-mnist', 'train', cfg['pretrain_images']),
          *load_demo_split('fashion-mnist', 'validation', 2000))
    pred = pretrained_predecessor(FIGURE_PRED_ARGS, cfg, fm, 'vit192')
    torch.manual_seed(1)
    model = timm.create_model('v_jetmoe_tiny', **FIGURE_SUCC_ARGS)
    r = recycle(model, pred, calib=torch.utils.data.TensorDataset(fm[0][:1024]), num_calib=1024, progress=False)
    model.load_state_dict(r.state_dict)
    model.reset_classifier(10)
    x, y = load_demo_split('mnist5k', 'train')
    xt, yt = load_demo_split('mnist5k', 'validation')
    accs = train(model, x, y, xt, yt, args.epochs, 64, cfg['lr'], desc='fine-tune')
    print(f'MNIST-5k test accuracy after {args.epochs} epoch(s): {accs[-1]:.1f}%')
    picks = torch.stack([(yt == d).nonzero()[0, 0] for d in (0, 3, 7, 8)])
    result = inspect_routing(model.eval(), xt[picks])
    paths = save_inspection(result, args.out)
    print('\n'.join(str(p) for p in paths))


if __name__ == '__main__':
    main()
