"""Publishing: the upload folder, the upload calls (against a recording stand-in for `HfApi`), the token never
written or logged, clear errors offline, and `--push_to_hub` publishing the project's card."""

import json
import logging
import runpy
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import test_trainer
from helpers import save_tiny_model, save_tiny_run
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from test_trainer import experiment_argv

import cps_hf.hub
from cps_hf.experiment import parse_experiment_arguments, run_experiment
from cps_hf.hub import build_upload_folder, publish_model, remote_code_files
from cps_hf.modelcard import render_model_card

# The small synthetic dataset of the training tests, generated once per module.
synthetic_cache = test_trainer.synthetic_cache

FAKE_TOKEN = "hf_cpsHfTestTokenThatMustNeverBeWritten0123"


class RecordingHubApi:
    """Stands in for `huggingface_hub.HfApi`: records every call and the files of the uploaded folder."""

    instances: list["RecordingHubApi"] = []
    endpoint = "https://hub.invalid"

    def __init__(self, token=None):
        self.token = token
        self.calls = []
        self.uploaded: dict[str, bytes] = {}
        RecordingHubApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"token-owner/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        self.uploaded = {path.name: path.read_bytes() for path in Path(kwargs["folder_path"]).iterdir()}
        pr_url = "https://hub.invalid/discussions/1" if kwargs.get("create_pr") else None
        return SimpleNamespace(commit_url="https://hub.invalid/commit/abc", pr_url=pr_url)


@pytest.fixture
def recording_hub(monkeypatch):
    RecordingHubApi.instances = []
    monkeypatch.setattr(cps_hf.hub, "HfApi", RecordingHubApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return RecordingHubApi.instances


def assert_token_nowhere(token: str, folders: list[Path], *texts: str) -> None:
    for text in texts:
        assert token not in text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), f"the token is written in {path}"


def test_remote_code_files_follow_relative_imports(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    assert [path.name for path in remote_code_files(model_dir)] == [
        "configuration_cps.py",
        "losses.py",
        "modeling_cps.py",
    ]
    config = json.loads((model_dir / "config.json").read_text())
    del config["auto_map"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no `auto_map`"):
        remote_code_files(model_dir)


def test_dry_run_folder_holds_exactly_what_is_published(tmp_path):
    run = save_tiny_run(tmp_path / "run")
    # What a training run also leaves behind and must not be published.
    (run / "training_args.bin").write_bytes(b"pickled arguments")
    (run / "trainer_state.json").write_text("{}")
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "optimizer.pt").write_bytes(b"optimizer state")
    (run / "README.md").write_text("an older card")
    extra_report = tmp_path / "reports" / "eval_whole.json"
    extra_report.parent.mkdir()
    extra_report.write_text((run / "eval_slide.json").read_text().replace('"slide"', '"whole"'))

    names = build_upload_folder(run, tmp_path / "upload", "my-org/tiny-cps", results_files=[extra_report])
    assert names == sorted(
        [
            "README.md",
            "config.json",
            "preprocessor_config.json",
            "model.safetensors",
            "configuration_cps.py",
            "modeling_cps.py",
            "losses.py",
            "cps_recipe.json",
            "eval_results.json",
            "all_results.json",
            "eval_slide.json",
            "eval_whole.json",
            # A run on the synthetic dataset: its first validation images, for the Hub widget.
            "example_1.png",
            "example_2.png",
        ]
    )
    assert sorted(path.name for path in (tmp_path / "upload").iterdir()) == names
    for name in names:
        if name != "README.md" and not name.startswith("example_"):
            source = run / name if (run / name).exists() else extra_report
            assert (tmp_path / "upload" / name).read_bytes() == source.read_bytes(), name
    card = ModelCard.load(tmp_path / "upload" / "README.md")
    assert card.data.model_name == "tiny-cps"
    assert len(card.data.eval_results) == 7  # trainer + 3 sliding-window + 3 whole-image reports
    assert 'pipeline("image-segmentation", model="my-org/tiny-cps", trust_remote_code=True)' in card.text
    assert card.data.pipeline_tag == "image-segmentation"
    assert [example["src"] for example in card.data.widget] == [
        f"{huggingface_hub.constants.ENDPOINT}/my-org/tiny-cps/resolve/main/example_{index}.png"
        for index in (1, 2)
    ]
    example = Image.open(tmp_path / "upload" / "example_1.png")
    assert example.mode == "RGB" and example.size == (96, 96)

    with pytest.raises(ValueError, match="not empty"):
        build_upload_folder(run, tmp_path / "upload", "my-org/tiny-cps")
    clashing = tmp_path / "other" / "eval_slide.json"
    clashing.parent.mkdir()
    clashing.write_text((run / "eval_slide.json").read_text())
    with pytest.raises(ValueError, match="Two files would be uploaded as eval_slide.json"):
        build_upload_folder(run, tmp_path / "upload-2", "my-org/tiny-cps", results_files=[clashing])


def test_upload_calls_and_the_token_is_never_written_or_logged(
    tmp_path, recording_hub, monkeypatch, caplog, capsys
):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    run = save_tiny_run(tmp_path / "run")
    with caplog.at_level(logging.DEBUG):
        url = publish_model(run, "my-org/tiny-cps", private=True, revision="experiments", create_pr=True)
    assert url == "https://hub.invalid/discussions/1"
    (api,) = recording_hub
    assert api.token is None  # the Hub client reads HF_TOKEN itself; cps_hf never holds it
    assert [call[0] for call in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][2] == {"private": True, "exist_ok": True}
    assert api.calls[1][2] == {"branch": "experiments", "exist_ok": True}
    upload = api.calls[2][2]
    assert upload["revision"] == "experiments" and upload["create_pr"] is True
    assert "README.md" in api.uploaded and "training_args.bin" not in api.uploaded
    assert b"model-index" in api.uploaded["README.md"]
    output = capsys.readouterr()
    assert_token_nowhere(
        FAKE_TOKEN,
        [tmp_path],
        caplog.text,
        output.out,
        output.err,
        repr(api.calls),
        *(content.decode(errors="replace") for content in api.uploaded.values()),
    )


def test_publish_fails_clearly_offline_without_token_or_network(tmp_path, recording_hub, monkeypatch):
    run = save_tiny_run(tmp_path / "run")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE.*--dry_run"):
        publish_model(run, "my-org/tiny-cps")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(cps_hf.hub, "get_token", lambda: None)
    with pytest.raises(OSError, match="No Hugging Face token"):
        publish_model(run, "my-org/tiny-cps")
    assert recording_hub == []

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setattr(cps_hf.hub, "HfApi", lambda token=None: HfApi(endpoint=endpoint, token=token))
    with pytest.raises(ConnectionError, match=f"Could not reach the Hub at {endpoint}"):
        publish_model(run, "my-org/tiny-cps", token=FAKE_TOKEN)


def test_push_to_hub_publishes_the_project_card_not_the_trainers(
    tmp_path,
    synthetic_cache,
    recording_hub,
    monkeypatch,
    caplog,
):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    output_dir = tmp_path / "run"
    argv = experiment_argv(
        output_dir,
        synthetic_cache,
        "--max_steps",
        "2",
        "--push_to_hub",
        "true",
        "--hub_model_id",
        "my-org/tiny-cps",
        "--hub_token",
        FAKE_TOKEN,
    )
    with caplog.at_level(logging.INFO):
        results = run_experiment(*parse_experiment_arguments(argv)[:3])
    (api,) = recording_hub
    assert api.token == FAKE_TOKEN  # handed to the Hub client only
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == "my-org/tiny-cps"
    card = api.uploaded["README.md"].decode()
    examples = ["example_1.png", "example_2.png"]  # the run is on the synthetic dataset
    assert set(examples) <= set(api.uploaded)
    assert card == str(render_model_card(output_dir, repo_id="my-org/tiny-cps", example_images=examples))
    assert "generated_from_trainer" not in card and "Cross Pseudo Supervision" in card
    assert f"value: {round(100 * results['eval_mean_iou'], 2)}" in card
    assert not any(name.startswith(("checkpoint", "training_args", "optimizer")) for name in api.uploaded)
    assert_token_nowhere(FAKE_TOKEN, [output_dir], caplog.text)


def run_publish_script(monkeypatch, *arguments: str) -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "publish.py"
    monkeypatch.setattr(sys, "argv", [str(script), *arguments])
    runpy.run_path(str(script), run_name="__main__")


def test_publish_script_card_only_dry_run_and_upload(tmp_path, recording_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    run = save_tiny_run(tmp_path / "run")
    common = ["--model", str(run), "--repo_id", "my-org/tiny-cps", "--dataset_id", "my-org/shapes"]
    run_publish_script(monkeypatch, *common, "--card_only", str(tmp_path / "card.md"))
    expected_card = str(render_model_card(run, repo_id="my-org/tiny-cps", dataset_id="my-org/shapes"))
    assert (tmp_path / "card.md").read_text() == expected_card
    run_publish_script(monkeypatch, *common, "--dry_run", str(tmp_path / "upload"))
    # The published card also shows the uploaded example images in the widget.
    expected_card = str(
        render_model_card(
            run,
            repo_id="my-org/tiny-cps",
            dataset_id="my-org/shapes",
            example_images=["example_1.png", "example_2.png"],
        )
    )
    assert (tmp_path / "upload" / "README.md").read_text() == expected_card
    assert recording_hub == []
    run_publish_script(monkeypatch, *common, "--private", "true", "--revision", "v2", "--create_pr", "true")
    (api,) = recording_hub
    assert api.calls[0][2]["private"] is True and api.calls[2][2]["create_pr"] is True
    assert api.uploaded["README.md"].decode() == expected_card
