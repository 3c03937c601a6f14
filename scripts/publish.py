"""Publish a trained CPS model on the Hugging Face Hub, with its model card and the code for `trust_remote_code`.

    python scripts/publish.py --model outputs/cps-demo --repo_id my-org/cps-demo
    python scripts/publish.py --model outputs/cps-demo --repo_id my-org/cps-demo --dry_run /tmp/cps-demo-upload
    python scripts/publish.py --model outputs/cps-demo --repo_id my-org/cps-demo --dry_run upload/cps-demo \
        --space_dir upload/cps-demo-space --example_images photo1.png photo2.png
    python scripts/publish.py --model outputs/cps-demo --repo_id my-org/cps-demo --card_only model_cards/cps-demo.md \\
        --results_files docs/demo/cps-demo-eval.json

The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub-compatible server.
"""

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from cps_hf.hub import build_space_folder, build_upload_folder, publish_model
from cps_hf.modelcard import render_model_card


@dataclass
class PublishArguments:
    """Which model, where to, and how."""

    model: str = field(metadata={"help": "The trained model folder (a training run's output_dir)."})
    repo_id: str = field(
        metadata={"help": "Hub repository: org/name (or name, in the token owner's namespace)."}
    )
    private: bool | None = field(default=None, metadata={"help": "Create the repository private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to commit to (created if missing)."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of committing."})
    results_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "More evaluation reports of scripts/evaluate_cps.py to upload and report in the card."
        },
    )
    dataset_id: str | None = field(
        default=None, metadata={"help": "Hub id of the training dataset when the run read a local copy."}
    )
    commit_message: str | None = field(default=None, metadata={"help": "Commit message."})
    dry_run: str | None = field(
        default=None, metadata={"help": "Write the folder that would be uploaded here instead of uploading."}
    )
    card_only: str | None = field(
        default=None, metadata={"help": "Only render the model card to this file (no upload)."}
    )
    example_images: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Example images for the Hub widget and the Space (default: the model folder's example_*.png, "
            "or validation images of the synthetic dataset for runs on it)."
        },
    )
    space_dir: str | None = field(
        default=None,
        metadata={"help": "Also write a Gradio Space serving the web demo of --repo_id to this folder."},
    )


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(PublishArguments).parse_args_into_dataclasses(args=argv)
    if args.space_dir:
        names = build_space_folder(args.model, args.space_dir, args.repo_id, args.example_images)
        print(
            f"Space folder written to {args.space_dir}: {', '.join(names)} "
            f"(upload: hf upload --repo-type space SPACE_ID {args.space_dir})"
        )
    if args.card_only:
        card = render_model_card(args.model, args.repo_id, args.results_files, args.dataset_id)
        card.save(args.card_only)
        print(f"Model card written to {args.card_only}")
    elif args.dry_run:
        names = build_upload_folder(
            args.model, args.dry_run, args.repo_id, args.results_files, args.dataset_id, args.example_images
        )
        print(f"Upload folder written to {args.dry_run}: {', '.join(names)}")
    else:
        url = publish_model(
            args.model,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            results_files=args.results_files,
            dataset_id=args.dataset_id,
            commit_message=args.commit_message,
            example_images=args.example_images,
        )
        print(f"Published: {url}")


if __name__ == "__main__":
    main()
