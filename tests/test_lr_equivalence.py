"""The learning rate and weight decay of the paper configs reproduce the official code's parameter trajectory.

The official code ran W processes, each on 8 / W labelled images, and divided its (per-process mean) loss by W after
a value-only all-reduce; DDP then averaged the gradients. Its SGD therefore saw `g / W + wd · p`, where `g` is the
gradient of the global mean loss, and stepped with the nominal learning rate:

    official: buffer ← 0.9 · buffer + (g / W + wd · p),    p ← p − lr_nominal · buffer
    ours:     buffer ← 0.9 · buffer + (g + W · wd · p),    p ← p − (lr_nominal / W) · buffer

Our buffer is W times the official one at every step (by induction, both start at zero and the update is linear), so
both take the same step. With the poly schedule both learning rates are scaled by the same factor. Hence the configs'
`learning_rate = lr_nominal / W = 0.0025` and `weight_decay = W · 1e-4` (VOC: 0.01, W = 4; Cityscapes: 0.02, W = 8).

"Ours" below is the real training stack: the paper config parsed by `parse_experiment_arguments`, the optimiser and
scheduler made by `CPSTrainer` (SGD from `optim`/`optim_args`, decay on conv/linear weights only, poly decay).
"""

from pathlib import Path

import pytest
import torch
from torch import nn

from cps_hf.experiment import parse_experiment_arguments
from cps_hf.trainer import CPSTrainer

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_WEIGHT_DECAY = 1e-4
GLOBAL_BATCH_SIZE = 8
NUM_STEPS = 25
TOTAL_STEPS = 50  # poly schedule length: the learning rate has decayed noticeably by the last simulated step

# (config, official nominal learning rate, official number of GPUs)
OFFICIAL_SETUPS = [
    ("scripts/configs/voc/r50_1-8_cps.yaml", 0.01, 4),
    ("scripts/configs/cityscapes/r50_1-8_cps.yaml", 0.02, 8),
]


def toy_model() -> nn.Module:
    """Convolution and linear weights (decayed), their biases and a norm layer (not decayed); float64 so that the
    comparison measures the recipe, not rounding."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, kernel_size=3, padding=1),
        nn.GroupNorm(2, 6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).double()


def toy_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH_SIZE, 3, 5, 5, generator=generator, dtype=torch.float64),
            torch.randint(0, 4, (GLOBAL_BATCH_SIZE,), generator=generator),
        )
        for _ in range(NUM_STEPS)
    ]


def accumulate_data_parallel_gradients(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, world_size: int, loss_divisor: float
) -> None:
    """Gradients as DDP leaves them: each of `world_size` processes back-propagates its shard's mean loss divided
    by `loss_divisor`, and the gradients are averaged over processes."""
    for shard_images, shard_labels in zip(images.chunk(world_size), labels.chunk(world_size)):
        loss = nn.functional.cross_entropy(model(shard_images), shard_labels) / loss_divisor
        loss.backward()
    for parameter in model.parameters():
        parameter.grad /= world_size


def official_trajectory(nominal_learning_rate: float, world_size: int) -> list[torch.Tensor]:
    """The official step: loss / W under DDP, SGD at the nominal learning rate, weight decay 1e-4 on conv/linear
    weights only, poly learning rate (power 0.9) set before every step."""
    model = toy_model()
    decayed = [module.weight for module in model.modules() if isinstance(module, nn.Conv2d | nn.Linear)]
    decayed_ids = {id(parameter) for parameter in decayed}
    not_decayed = [parameter for parameter in model.parameters() if id(parameter) not in decayed_ids]
    optimizer = torch.optim.SGD(
        [
            {"params": decayed, "weight_decay": OFFICIAL_WEIGHT_DECAY},
            {"params": not_decayed, "weight_decay": 0.0},
        ],
        lr=nominal_learning_rate,
        momentum=0.9,
    )
    for step, (images, labels) in enumerate(toy_batches()):
        for group in optimizer.param_groups:
            group["lr"] = nominal_learning_rate * (1 - step / TOTAL_STEPS) ** 0.9
        optimizer.zero_grad()
        accumulate_data_parallel_gradients(model, images, labels, world_size, loss_divisor=world_size)
        optimizer.step()
    return [parameter.detach().clone() for parameter in model.parameters()]


def trainer_trajectory(
    config: str, world_size: int, tmp_path: Path, overrides: list[str]
) -> list[torch.Tensor]:
    """Our step: mean loss under DDP, optimiser and scheduler exactly as `CPSTrainer` builds them from `config`."""
    # No evaluation: the toy run has no validation set (the schedule does not depend on it).
    _, _, training_args, _ = parse_experiment_arguments(
        [str(REPO_ROOT / config), "--output_dir", str(tmp_path), "--eval_strategy", "no", *overrides]
    )
    model = toy_model()
    # The toy model has no segmentation config to derive metrics from; nothing is evaluated here.
    trainer = CPSTrainer(model=model, args=training_args, compute_metrics=no_metrics)
    trainer.create_optimizer_and_scheduler(num_training_steps=TOTAL_STEPS)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    for images, labels in toy_batches():
        optimizer.zero_grad()
        accumulate_data_parallel_gradients(model, images, labels, world_size, loss_divisor=1.0)
        optimizer.step()
        scheduler.step()
    return [parameter.detach().clone() for parameter in model.parameters()]


def no_metrics(eval_prediction, compute_result: bool = False) -> dict[str, float]:
    return {}


def max_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first, second))


@pytest.mark.parametrize("config, nominal_learning_rate, world_size", OFFICIAL_SETUPS)
def test_paper_config_reproduces_the_official_trajectory(tmp_path, config, nominal_learning_rate, world_size):
    _, _, training_args, _ = parse_experiment_arguments(
        [str(REPO_ROOT / config), "--output_dir", str(tmp_path)]
    )
    assert training_args.learning_rate == pytest.approx(nominal_learning_rate / world_size)
    assert training_args.weight_decay == pytest.approx(world_size * OFFICIAL_WEIGHT_DECAY)

    official = official_trajectory(nominal_learning_rate, world_size)
    ours = trainer_trajectory(config, world_size, tmp_path, overrides=[])
    initial = [parameter.detach() for parameter in toy_model().parameters()]
    assert max_difference(official, initial) > 1e-3  # the parameters really moved
    assert max_difference(ours, official) < 1e-9


@pytest.mark.parametrize("config, nominal_learning_rate, world_size", OFFICIAL_SETUPS)
@pytest.mark.parametrize(
    "mapping", ["effective lr, official weight decay", "nominal lr, official weight decay"]
)
def test_naive_mappings_do_not_reproduce_it(tmp_path, config, nominal_learning_rate, world_size, mapping):
    learning_rate = (
        nominal_learning_rate / world_size if mapping.startswith("effective") else nominal_learning_rate
    )
    overrides = ["--learning_rate", str(learning_rate), "--weight_decay", str(OFFICIAL_WEIGHT_DECAY)]
    official = official_trajectory(nominal_learning_rate, world_size)
    naive = trainer_trajectory(config, world_size, tmp_path, overrides)
    assert max_difference(naive, official) > 1e-6
