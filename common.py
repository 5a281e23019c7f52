"""The one module the two training scripts import: it re-exports the small library in mnv4/.

mnv4/ holds one concern per module; its imports point one way (a module imports only those above it):
  errors, blocks, model    the exceptions; the blocks (UIB and friends); MobileNetV4 as tables and one builder
  data, augment, batches   CIFAR-10 on the device, batched augmentation and TTA views, each epoch's batches
  device, distributed      device and precision in one place; torchrun
  files, checkpoint        atomic writes; checkpoints and the resume check
  cli                      the flags both scripts share, recipes, --config replay
  optim, evaluation        weight-decay groups and the EMA; evaluation and TTA
  meter, report, stop      the epoch's sums; what a person sees; SIGINT / SIGTERM
  provenance, epochs, run  what produced a result; the epoch loop's bookkeeping; the Run the scripts use
Importing it (or any mnv4 module) has no side effects.
"""

from mnv4.augment import (
    HUE,
    TTA_VIEWS,
    AugmentConfig,
    _adjust_hue,
    augment,
    augment_config,
    color_jitter,
    geometric_transform,
    sample_augment_params,
)
from mnv4.batches import train_batches_for_epoch
from mnv4.blocks import SE_REDUCTION, LayerScale2d, MobileMQA, Residual, make_divisible, uib, uib_branch
from mnv4.checkpoint import eval_weights, load_checkpoint, model_from_checkpoint, save_checkpoint
from mnv4.cli import ArgumentParser, HelpFormatter, build_parser, chosen_recipe, command_line, parse_args
from mnv4.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    Cifar10,
    batch_seed,
    epoch_order,
    load_cifar10,
    normalize,
)
from mnv4.device import (
    AMP_MODES,
    AMP_NAMES,
    DEVICES,
    MPS_CHANNELS_LAST,
    autocast_dtype,
    channels_last_allowed,
    cpu_model,
    default_channels_last,
    device_name,
    device_warnings,
    peak_memory_mb,
    precision_context,
    reduced_precision,
    rng_state,
    seed_everything,
    select_device,
    set_rng_state,
    synchronize,
)
from mnv4.distributed import Distributed
from mnv4.errors import Interrupted, NonFiniteLoss, UserError
from mnv4.evaluation import evaluate, predict_probs, tta_table
from mnv4.files import atomic_write, current_umask, save_figure, write_json
from mnv4.model import (
    BLOCK_TABLES,
    OUTPUT_STRIDES,
    VARIANTS,
    MobileNetV4,
    count_macs,
    count_params,
    init_weights,
    mobilenetv4,
    model_from_args,
    model_summary,
)
from mnv4.optim import ModelEma, weight_decay_groups
from mnv4.provenance import git_commit, provenance, versions
from mnv4.report import NOTEBOOK_REPORTED
from mnv4.run import Run
