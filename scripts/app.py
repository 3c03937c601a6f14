"""Web demo of a trained CPS model: a Gradio app to upload or pick an image and see its segmentation.

    python scripts/app.py --model outputs/cps-demo                 # http://127.0.0.1:7860
    python scripts/app.py --model my-org/cps-demo --port 8080 --examples photo1.png photo2.png

The page shows the overlay, a legend with the class colours and each class's share of the pixels, a branch /
ensemble selector and the mIoUs recorded in the model card. It listens on 127.0.0.1 unless `--host` says otherwise.
"""

import os
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from cps_hf.web_demo import DEMO_CSS, build_demo


@dataclass
class AppArguments:
    """Which model, and where to serve it."""

    model: str = field(metadata={"help": "Saved CPS model: a local folder or a Hub id."})
    port: int = field(default=7860, metadata={"help": "Port to listen on."})
    host: str = field(
        default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."}
    )
    examples: list[str] = field(
        default_factory=list,
        metadata={"help": "Example images to pick from (default: the model folder's example_*.png)."},
    )


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(AppArguments).parse_args_into_dataclasses(args=argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_demo(args.model, args.examples or None)
    demo.launch(server_name=args.host, server_port=args.port, css=DEMO_CSS)


if __name__ == "__main__":
    main()
