"""A real Hub round trip: the folder `scripts/publish.py --dry_run` writes is committed as a repository of olah (a
Hub-API-compatible server, in its own environment, see `.ci/run`) on loopback, then loaded through `HF_ENDPOINT` as a
user would load it from the Hub, without cps_hf: model, image processor, pipeline and model card."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_model
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoImageProcessor, pipeline

from cps_hf import CPSForSemanticSegmentation

REPO_ROOT = Path(__file__).resolve().parents[1]
OLAH_PYTHON = Path(os.environ.get("CPS_OLAH_PYTHON", REPO_ROOT / ".venv-olah" / "bin" / "python"))
OLAH_LAUNCHER = Path(__file__).resolve().parent / "olah_local_hub.py"
REPO_ID = "cps-test/tiny-cps"


def olah_missing_reason() -> str | None:
    if not OLAH_PYTHON.is_file():
        return (
            f"olah is not installed at {OLAH_PYTHON} (`.ci/run` installs it: python3 -m venv .venv-olah && "
            ".venv-olah/bin/python -m pip install olah==0.5.4; or set CPS_OLAH_PYTHON)"
        )
    if shutil.which("git") is None:
        return "olah serves repositories from git folders, and git is not on PATH"
    return None


pytestmark = pytest.mark.skipif(olah_missing_reason() is not None, reason=str(olah_missing_reason()))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_listening(port: int, process: subprocess.Popen, log_path: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"olah exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"olah did not listen on port {port} within {timeout} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture
def local_hub(tmp_path):
    """olah on 127.0.0.1, offline (it never contacts huggingface.co), serving git repositories under `mirrors/`.
    Yields `(endpoint, mirrors)`; the server is stopped by its process id."""
    port = free_port()
    mirrors = tmp_path / "olah" / "mirrors"
    mirrors.mkdir(parents=True)
    config = tmp_path / "olah" / "olah.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [basic]
            host = "127.0.0.1"
            port = {port}
            repos-path = "{tmp_path / "olah" / "cache"}"
            mirrors-path = ["{mirrors}"]

            [accessibility]
            offline = true
            """
        )
    )
    log_path = tmp_path / "olah" / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                str(OLAH_PYTHON),
                str(OLAH_LAUNCHER),
                "-c",
                str(config),
                "--log-path",
                str(tmp_path / "olah" / "logs"),
            ],
            cwd=tmp_path / "olah",
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_listening(port, process, log_path)
        yield f"http://127.0.0.1:{port}", mirrors
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def commit_as_repository(folder: Path, repository: Path) -> None:
    """Makes `repository` a git repository whose `main` branch holds exactly the files of `folder`."""
    shutil.copytree(folder, repository)
    git = [
        "git",
        "-C",
        str(repository),
        "-c",
        "user.name=cps_hf tests",
        "-c",
        "user.email=tests@cps-hf.invalid",
    ]
    for arguments in (["init", "--quiet"], ["checkout", "--quiet", "-b", "main"], ["add", "--all"]):
        subprocess.run([*git, *arguments], check=True)
    subprocess.run(
        [*git, "commit", "--quiet", "--message", "Upload folder from scripts/publish.py --dry_run"],
        check=True,
    )


CLIENT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from huggingface_hub import ModelCard
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

    torch.set_num_threads(1)
    repo_id, image_path, output_dir = sys.argv[1:]
    image = Image.open(image_path)
    model = AutoModelForSemanticSegmentation.from_pretrained(repo_id, trust_remote_code=True).eval()
    image_processor = AutoImageProcessor.from_pretrained(repo_id)
    with torch.no_grad():
        logits = model(**image_processor(images=image, return_tensors="pt")).logits
    np.save(f"{output_dir}/logits.npy", logits.numpy())
    segmenter = pipeline("image-segmentation", model=repo_id, trust_remote_code=True)
    np.savez(f"{output_dir}/masks.npz", **{item["label"]: np.array(item["mask"]) for item in segmenter(image)})
    with open(f"{output_dir}/README.md", "w", encoding="utf-8") as file:
        file.write(str(ModelCard.load(repo_id)))
    summary = {
        "model_module": type(model).__module__,
        "image_processor": image_processor.to_dict(),
        "cps_hf_imported": any(name.split(".")[0] == "cps_hf" for name in sys.modules),
    }
    with open(f"{output_dir}/summary.json", "w") as file:
        json.dump(summary, file)
    """
)


def test_dry_run_folder_loads_through_a_hub_server(tmp_path, local_hub):
    endpoint, mirrors = local_hub
    model_dir = save_tiny_model(tmp_path / "run")
    upload = tmp_path / "upload"
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "publish.py"),
            "--model",
            str(model_dir),
            "--repo_id",
            REPO_ID,
            "--dry_run",
            str(upload),
        ],
        check=True,
        capture_output=True,
        cwd=REPO_ROOT,
    )
    commit_as_repository(upload, mirrors / "models" / REPO_ID)

    image_path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(image_path)
    image = Image.open(image_path)
    local_model = CPSForSemanticSegmentation.from_pretrained(upload).eval()
    local_processor = AutoImageProcessor.from_pretrained(upload)
    with torch.no_grad():
        local_logits = local_model(**local_processor(images=image, return_tensors="pt")).logits.numpy()
    local_masks = {
        item["label"]: np.array(item["mask"])
        for item in pipeline("image-segmentation", model=str(upload))(image)
    }

    # A user's machine: the Hub endpoint, no offline mode, an empty cache, no token, cps_hf never imported.
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHONPATH"))
    }
    environment.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    client_output = tmp_path / "client"
    client_output.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, REPO_ID, str(image_path), str(client_output)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    summary = json.loads((client_output / "summary.json").read_text())
    assert summary["cps_hf_imported"] is False
    assert summary["model_module"].startswith("transformers_modules.")
    assert summary["image_processor"] == json.loads(local_processor.to_json_string())
    np.testing.assert_allclose(np.load(client_output / "logits.npy"), local_logits, rtol=0, atol=1e-6)
    remote_masks = np.load(client_output / "masks.npz")
    assert sorted(remote_masks.files) == sorted(local_masks)
    for label, mask in local_masks.items():
        np.testing.assert_array_equal(remote_masks[label], mask)
    remote_card = ModelCard.load(client_output / "README.md")
    assert str(remote_card) == (upload / "README.md").read_text(encoding="utf-8")
    assert remote_card.data.to_dict() == ModelCard.load(upload / "README.md").data.to_dict()
