"""Publishing a trained CPS model on the Hugging Face Hub: the folder to upload (weights, configuration, image
processor, model card, the model code for `trust_remote_code`, results files) and the upload itself.

The token is never read into this module's state: `huggingface_hub` takes it from `HF_TOKEN` or the login cache
(`hf auth login`), or from an explicit `token` argument that is only passed on to [`~huggingface_hub.HfApi`].
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import OfflineModeIsEnabled
from PIL import Image as PILImage
from transformers import TrainingArguments
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging

from .data.synthetic import synthetic_sample
from .modelcard import (
    SYNTHETIC_DATASET_NAME,
    find_evaluation_reports,
    read_json,
    read_recipe,
    render_model_card,
)

logger = logging.get_logger(__name__)

CONFIG_FILE_NAMES = ("config.json", "preprocessor_config.json")
# What the run measured and how it was trained; checkpoints, optimizer states and pickled arguments stay local.
RESULTS_FILE_NAMES = ("cps_recipe.json", "eval_results.json", "all_results.json", "train_results.json")
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MODEL_CARD_NAME = "README.md"
EXAMPLE_IMAGE_PATTERN = "example_*.png"
"""Example images uploaded with a model (shown by the Hub widget and the web demo): `example_1.png`, ..."""
NUM_SYNTHETIC_EXAMPLES = 2
SPACE_EXAMPLES_DIR = "examples"
# Beyond cps_hf's own dependencies, what a Space running the web demo installs.
SPACE_EXTRA_REQUIREMENTS = ("gradio>=6",)


def remote_code_files(model_dir: str | Path) -> list[Path]:
    """
    The Python files `trust_remote_code` loading needs: the modules named in the `auto_map` of `config.json` (and of
    `preprocessor_config.json`, if any) and every file they import relatively, as saved next to the weights.

    Raises:
        ValueError: if the configuration has no `auto_map` or a named module is missing from the folder.
    """
    model_dir = Path(model_dir)
    references = []
    for name in CONFIG_FILE_NAMES:
        path = model_dir / name
        if path.is_file():
            references.extend(read_json(path).get("auto_map", {}).values())
    # `repo--module.Class` points at code in another repository: nothing to ship from here.
    modules = sorted({reference.split(".")[0] for reference in references if "--" not in reference})
    if not modules:
        raise ValueError(
            f"{model_dir / 'config.json'} has no `auto_map`, so the model would not load with trust_remote_code. "
            "Re-save it after `import cps_hf` (which registers the classes for remote code)."
        )
    files = set()
    for module in modules:
        path = model_dir / f"{module}.py"
        if not path.is_file():
            raise ValueError(f"{model_dir} lacks {path.name}, named in its `auto_map`.")
        files.add(path)
        files.update(Path(relative) for relative in get_relative_import_files(str(path)))
    return sorted(files)


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors weights (a single file, or shards with their index).

    Raises:
        ValueError: if the folder holds no safetensors weights (pickled `.bin` weights are never published).
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no *.safetensors weights.")
    index = model_dir / WEIGHTS_INDEX_NAME
    return files + ([index] if index.is_file() else [])


def files_to_upload(model_dir: str | Path, results_files: Sequence[str | Path] = ()) -> list[Path]:
    """Every file copied as is into the upload folder (the card is rendered separately)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a saved model folder (no config.json).")
    present = [
        model_dir / name for name in (*CONFIG_FILE_NAMES, *RESULTS_FILE_NAMES) if (model_dir / name).is_file()
    ]
    files = [
        *weight_files(model_dir),
        *present,
        *remote_code_files(model_dir),
        *find_evaluation_reports(model_dir),
    ]
    files.extend(Path(path) for path in results_files)
    by_name: dict[str, Path] = {}
    for path in files:
        if not path.is_file():
            raise ValueError(f"Results file {path} does not exist.")
        known = by_name.setdefault(path.name, path)
        if known.resolve() != path.resolve():
            raise ValueError(f"Two files would be uploaded as {path.name}: {known} and {path}; rename one.")
    return list(by_name.values())


def example_image_name(index: int) -> str:
    return EXAMPLE_IMAGE_PATTERN.replace("*", str(index + 1))


def write_example_images(
    model_dir: str | Path, folder: str | Path, example_images: Sequence[str | Path] = ()
) -> list[str]:
    """
    Writes the example images of a model into `folder` as `example_1.png`, `example_2.png`, ...: the given files
    (any format PIL reads), else the `example_*.png` already in `model_dir`, else, for a run on the synthetic
    dataset, its first validation images. Other runs get none unless images are given.

    Returns:
        `list[str]`: the names written, in order.
    """
    model_dir, folder = Path(model_dir), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if example_images:
        images = []
        for path in example_images:
            if not Path(path).is_file():
                raise ValueError(f"Example image {path} does not exist.")
            images.append(PILImage.open(path).convert("RGB"))
    elif shipped := sorted(model_dir.glob(EXAMPLE_IMAGE_PATTERN)):
        images = [PILImage.open(path).convert("RGB") for path in shipped]
    else:
        data = (read_recipe(model_dir) or {}).get("data", {})
        if (data.get("dataset_name") or SYNTHETIC_DATASET_NAME) != SYNTHETIC_DATASET_NAME:
            logger.warning(
                f"No example images for {model_dir}: pass some (`--example_images`) for the Hub widget and the demo."
            )
            return []
        size = int(data.get("synthetic_image_size", 96))
        images = [
            PILImage.fromarray(synthetic_sample("validation", index, size)[0])
            for index in range(NUM_SYNTHETIC_EXAMPLES)
        ]
    names = []
    for index, image in enumerate(images):
        names.append(example_image_name(index))
        image.save(folder / names[-1])
    return names


def build_upload_folder(
    model_dir: str | Path,
    folder: str | Path,
    repo_id: str,
    results_files: Sequence[str | Path] = (),
    dataset_id: str | None = None,
    example_images: Sequence[str | Path] = (),
) -> list[str]:
    """
    Writes exactly the folder that is uploaded: weights, `config.json`, `preprocessor_config.json`, the model code
    for `trust_remote_code`, the run's results files, example images for the Hub widget (see
    [`write_example_images`]) and a freshly rendered model card (`README.md`) whose `widget` metadata shows them.

    Args:
        model_dir (`str` or `Path`):
            The trained model (the `--output_dir` of a training run).
        folder (`str` or `Path`):
            Where to write; must not exist or be empty.
        repo_id (`str`):
            The Hub id the card is written for.
        results_files (`Sequence`, *optional*):
            More evaluation reports of `scripts/evaluate_cps.py` to copy and report in the card.
        dataset_id (`str`, *optional*):
            The Hub id of the training dataset when the run read a local copy (see [`render_model_card`]).
        example_images (`Sequence`, *optional*):
            Example images for the widget (default: see [`write_example_images`]).

    Returns:
        `list[str]`: the names of the files written, sorted.

    Raises:
        ValueError: if `folder` holds files, or `model_dir` is not a complete saved model.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty; give a new or empty folder.")
    files = files_to_upload(model_dir, results_files)
    folder.mkdir(parents=True, exist_ok=True)
    examples = write_example_images(model_dir, folder, example_images)
    card = render_model_card(
        model_dir,
        repo_id=repo_id,
        results_files=results_files,
        dataset_id=dataset_id,
        example_images=examples,
    )
    for path in files:
        shutil.copyfile(path, folder / path.name)
    card.save(folder / MODEL_CARD_NAME)
    return sorted([path.name for path in files] + examples + [MODEL_CARD_NAME])


SPACE_APP = """\"\"\"Web demo of {repo_id} (cps_hf): upload or pick an image and see its segmentation.\"\"\"

import os
from pathlib import Path

from cps_hf.web_demo import DEMO_CSS, build_demo

# CPS_DEMO_MODEL: another model (a Hub id or a local folder) to serve with this app.
MODEL = os.environ.get("CPS_DEMO_MODEL", {repo_id!r})
EXAMPLES = sorted(str(path) for path in (Path(__file__).parent / {examples_dir!r}).glob("*.png"))

demo = build_demo(MODEL, examples=EXAMPLES, title={title!r})

if __name__ == "__main__":
    demo.launch(css=DEMO_CSS)
"""


def space_requirements() -> list[str]:
    """The pip requirements of a Space running the web demo: cps_hf's own dependencies and Gradio."""
    requirements = [
        requirement
        for requirement in importlib.metadata.requires("cps_hf") or []
        if "extra ==" not in requirement
    ]
    return [*requirements, *SPACE_EXTRA_REQUIREMENTS]


def build_space_folder(
    model_dir: str | Path,
    folder: str | Path,
    repo_id: str,
    example_images: Sequence[str | Path] = (),
) -> list[str]:
    """
    Writes a Gradio Space that serves the web demo ([`~cps_hf.web_demo.build_demo`]) of the model published as
    `repo_id`: `app.py`, `requirements.txt`, `README.md` (the Space's metadata), the example images under
    `examples/`, and the `cps_hf` package itself (it is not on PyPI), so the Space needs nothing else.

    Args:
        model_dir (`str` or `Path`):
            The trained model (for its example images).
        folder (`str` or `Path`):
            Where to write; must not exist or be empty.
        repo_id (`str`):
            The model's Hub id, which the app loads.
        example_images (`Sequence`, *optional*):
            Example images (default: see [`write_example_images`]).

    Returns:
        `list[str]`: the top-level names written, sorted.

    Raises:
        ValueError: if `folder` holds files.
    """
    import cps_hf

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty; give a new or empty folder.")
    folder.mkdir(parents=True, exist_ok=True)
    write_example_images(model_dir, folder / SPACE_EXAMPLES_DIR, example_images)
    title = repo_id.split("/")[-1]
    (folder / "app.py").write_text(
        SPACE_APP.format(repo_id=repo_id, examples_dir=SPACE_EXAMPLES_DIR, title=title)
    )
    (folder / "requirements.txt").write_text("\n".join(space_requirements()) + "\n")
    (folder / "README.md").write_text(
        f"---\ntitle: {title}\nsdk: gradio\napp_file: app.py\nmodels:\n- {repo_id}\ntags:\n- cps_hf\n"
        f"- image-segmentation\n---\n\nWeb demo of [{repo_id}](https://huggingface.co/{repo_id}), made by "
        "`scripts/publish.py --space_dir` of cps_hf.\n"
    )
    package = Path(cps_hf.__file__).resolve().parent
    shutil.copytree(
        package,
        folder / "cps_hf",
        ignore=lambda directory, names: [
            name for name in names if name == "__pycache__" or name.endswith(".pyc")
        ],
    )
    return sorted(path.name for path in folder.iterdir())


def check_can_publish(token: str | None = None) -> None:
    """
    Fails early, before any work, when an upload cannot succeed.

    Raises:
        ConnectionError: if offline mode (`HF_HUB_OFFLINE`) is on.
        OSError: if no token is available.
    """
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(
            "HF_HUB_OFFLINE is set, so nothing can be uploaded. Unset it, or write the folder that would be "
            "uploaded with `scripts/publish.py --dry_run DIR`."
        )
    if token is None and get_token() is None:
        raise OSError(
            "No Hugging Face token found: set the HF_TOKEN environment variable or run `hf auth login` "
            "(a token with write access)."
        )


def _is_network_error(error: BaseException) -> bool:
    # httpx (huggingface_hub 1.x) and httpx2 (2.x) both name their connection-level errors TransportError.
    return isinstance(error, OfflineModeIsEnabled) or any(
        cls.__name__ == "TransportError" for cls in type(error).__mro__
    )


def publish_model(
    model_dir: str | Path,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    results_files: Sequence[str | Path] = (),
    dataset_id: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    example_images: Sequence[str | Path] = (),
) -> str:
    """
    Publishes a trained model: creates the repository if needed (and the branch `revision`), then uploads the
    folder [`build_upload_folder`] writes in one commit.

    Args:
        model_dir (`str` or `Path`):
            The trained model.
        repo_id (`str`):
            `org/name`, or `name` for the token owner's namespace.
        private (`bool`, *optional*):
            Visibility of a newly created repository (an existing one keeps its own).
        revision (`str`, *optional*):
            Branch to commit to, created from `main` if missing (default: `main`).
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request instead of committing to the branch.
        results_files (`Sequence`, *optional*):
            More evaluation reports to upload and report in the card.
        dataset_id (`str`, *optional*):
            The Hub id of the training dataset when the run read a local copy.
        commit_message (`str`, *optional*):
            The commit message.
        token (`str`, *optional*):
            A token; by default `HF_TOKEN` or the login cache. It is passed to the Hub client only.
        example_images (`Sequence`, *optional*):
            Example images for the widget (default: see [`write_example_images`]).

    Returns:
        `str`: the URL of the commit or pull request.

    Raises:
        ConnectionError: offline, or the Hub cannot be reached.
        OSError: no token.
    """
    check_can_publish(token)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="cps_hf_upload_") as folder:
        names = build_upload_folder(model_dir, folder, repo_id, results_files, dataset_id, example_images)
        logger.info(f"Publishing {model_dir} to {repo_id} ({len(names)} files: {', '.join(names)}).")
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message or f"Upload {Path(model_dir).resolve().name} (cps_hf)",
            )
        except Exception as error:
            if _is_network_error(error):
                raise ConnectionError(
                    f"Could not reach the Hub at {api.endpoint} to publish {repo_id} ({type(error).__name__}: "
                    f"{error}). Check the network (or HF_ENDPOINT); `scripts/publish.py --dry_run DIR` works offline."
                ) from error
            raise
    url = commit.pr_url or commit.commit_url
    logger.info(f"Published {repo_id}: {url}")
    return url


@dataclass
class HubPublishRequest:
    """
    What `--push_to_hub` asked for, taken over from the Trainer ([`take_over_hub_push`]) and published once at the
    end of the run with the project's card.

    Args:
        repo_id (`str`): `--hub_model_id`, or the output folder's name.
        private (`bool`, *optional*): `--hub_private_repo`.
        revision (`str`, *optional*): `--hub_revision`.
        token (`str`, *optional*): `--hub_token` (never shown in the representation).
    """

    repo_id: str
    private: bool | None = None
    revision: str | None = None
    token: str | None = field(default=None, repr=False)

    def publish(self, model_dir: str | Path) -> str:
        return publish_model(
            model_dir, self.repo_id, private=self.private, revision=self.revision, token=self.token
        )


def take_over_hub_push(training_args: TrainingArguments) -> HubPublishRequest | None:
    """
    Turns the Trainer's own Hub pushing off and returns what to publish at the end of the run instead (`None`
    without `--push_to_hub`). The Trainer would push checkpoints and `training_args.bin` and replace the card with
    its generated one. `--hub_token` is removed from the arguments so it is not pickled into `training_args.bin`.

    Raises:
        ConnectionError, OSError: as [`check_can_publish`], before any training.
    """
    if not training_args.push_to_hub:
        return None
    request = HubPublishRequest(
        repo_id=training_args.hub_model_id or Path(training_args.output_dir).resolve().name,
        private=training_args.hub_private_repo,
        revision=training_args.hub_revision,
        token=training_args.hub_token,
    )
    check_can_publish(request.token)
    training_args.push_to_hub = False
    training_args.hub_token = None
    return request


__all__ = [
    "HubPublishRequest",
    "build_space_folder",
    "build_upload_folder",
    "check_can_publish",
    "files_to_upload",
    "publish_model",
    "remote_code_files",
    "take_over_hub_push",
    "write_example_images",
]
