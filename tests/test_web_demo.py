"""The web demo: what it computes (overlay, legend, pixel shares, the card's numbers), the Space folder that
`scripts/publish.py --space_dir` writes, and the app driven in headless Chromium on 127.0.0.1.

The browser test needs `gradio`, `selenium` (`pip install cps_hf[deploy]`) and Debian's `chromium` and
`chromium-driver` (`.ci/run` installs them); it is skipped, with the reason, without them.
`CPS_WEB_DEMO_MODEL=<model folder>` serves another model, `CPS_WEB_DEMO_SCREENSHOT=<file.png>` keeps the screenshot
(`docs/demo/web_demo.png` was made this way from the demo model).
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_run
from PIL import Image

from cps_hf.data.synthetic import SYNTHETIC_CLASS_NAMES, synthetic_sample
from cps_hf.modelcard import write_model_card
from cps_hf.visualization import segmentation_palette
from cps_hf.web_demo import SegmentationDemo, class_legend_html, headline_numbers_markdown, pixel_shares

BROWSER_TIMEOUT_S = 90


@pytest.fixture
def tiny_run(tmp_path) -> Path:
    """A tiny model with results files and the card a training run writes."""
    run = save_tiny_run(tmp_path / "run")
    write_model_card(run, repo_id="my-org/tiny-cps")
    return run


def example_image(path: Path, index: int = 0, size: int = 96) -> Path:
    Image.fromarray(synthetic_sample("validation", index, size)[0]).save(path)
    return path


def test_pixel_shares_and_legend():
    mask = torch.tensor([[0, 0, 1], [1, 1, 4]])
    shares = pixel_shares(mask, 5)
    assert shares == pytest.approx([2 / 6, 3 / 6, 0.0, 0.0, 1 / 6])
    legend = class_legend_html(["bg", "a<b", "c", "d", "e"], segmentation_palette(5), shares)
    assert legend.count('class="cps-legend-row"') == 5
    assert "a&lt;b" in legend and "50.0 %" in legend and "16.7 %" in legend
    assert "rgb(128,0,0)" in legend  # class 1: the VOC palette's maroon


def test_segment_gives_an_overlay_of_the_image_size_and_shares_summing_to_one(tiny_run, tmp_path):
    demo = SegmentationDemo.from_pretrained(str(tiny_run))
    assert demo.branch_choices == ["branch 0", "branch 1", "ensemble"]
    image = Image.open(example_image(tmp_path / "example.png", size=72)).resize((80, 72))
    for choice in demo.branch_choices:
        result, legend = demo.segment(image, choice)
        assert result.size == image.size and result.mode == "RGB"
        assert legend.count('class="cps-legend-row"') == len(SYNTHETIC_CLASS_NAMES)
        shares = [float(cell.split(" %")[0]) for cell in legend.split('text-align:right">')[1:]]
        assert sum(shares) == pytest.approx(100.0, abs=0.1 * len(shares))
    with pytest.raises(ValueError, match="branch index"):
        demo.segment(image, "branch 2")


def test_headline_numbers_come_from_the_model_card(tiny_run, tmp_path):
    numbers = headline_numbers_markdown(str(tiny_run))
    # The trainer's evaluation (48.25) and the branches of the sliding-window report of `save_tiny_run`.
    assert "**48.25**" in numbers and "**41.25**" in numbers and "**42.17**" in numbers
    (tmp_path / "no-card").mkdir()
    assert "No model card" in headline_numbers_markdown(str(tmp_path / "no-card"))


def test_space_folder_runs_the_demo_with_its_own_copy_of_cps_hf(tiny_run, tmp_path):
    pytest.importorskip("gradio", reason="the web demo needs gradio (pip install 'cps_hf[deploy]')")
    from cps_hf.hub import build_space_folder

    space = tmp_path / "space"
    names = build_space_folder(tiny_run, space, "my-org/tiny-cps")
    assert names == ["README.md", "app.py", "cps_hf", "examples", "requirements.txt"]
    assert sorted(path.name for path in (space / "examples").iterdir()) == ["example_1.png", "example_2.png"]
    requirements = (space / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("gradio") for line in requirements)
    assert any(line.startswith("transformers") for line in requirements)
    assert "sdk: gradio" in (space / "README.md").read_text()
    # The app builds from the Space folder alone (its copy of cps_hf shadows the installed one), here on the local
    # model instead of the Hub id.
    check = (
        "import runpy, cps_hf; app = runpy.run_path('app.py'); "
        "assert cps_hf.__file__.startswith(str(__import__('pathlib').Path.cwd())), cps_hf.__file__; "
        "print(type(app['demo']).__name__, app['MODEL'], len(app['EXAMPLES']))"
    )
    environment = {**os.environ, "CPS_DEMO_MODEL": str(tiny_run), "GRADIO_ANALYTICS_ENABLED": "False"}
    environment.pop("PYTHONPATH", None)
    completed = subprocess.run(
        [sys.executable, "-c", check], cwd=space, env=environment, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split()[-3:] == ["Blocks", str(tiny_run), "2"]
    with pytest.raises(ValueError, match="not empty"):
        build_space_folder(tiny_run, space, "my-org/tiny-cps")


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _chromium_driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium")
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip(
            "the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
        # Loopback only: every other host name fails to resolve (e.g. web fonts), nothing leaves the machine.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=chromedriver)
    return webdriver.Chrome(options=options, service=service)


def test_web_demo_in_headless_chromium(tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("gradio", reason="the web demo needs gradio (pip install 'cps_hf[deploy]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from cps_hf.web_demo import DEMO_CSS, build_demo

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    model = os.environ.get("CPS_WEB_DEMO_MODEL", str(tiny_run))
    screenshot = Path(os.environ.get("CPS_WEB_DEMO_SCREENSHOT", tmp_path / "web_demo.png"))
    upload = example_image(tmp_path / "upload.png", index=5)
    num_labels = len(SegmentationDemo.from_pretrained(model).class_names)

    driver = _chromium_driver()
    demo = build_demo(model, examples=[str(example_image(tmp_path / "example_1.png", index=0))])
    try:
        port = _free_loopback_port()
        demo.launch(
            server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=DEMO_CSS
        )
        driver.set_page_load_timeout(BROWSER_TIMEOUT_S)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, BROWSER_TIMEOUT_S)
        file_input = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#cps-input input[type=file]"))
        file_input.send_keys(str(upload))
        overlay = wait.until(
            lambda d: next(
                (
                    img
                    for img in d.find_elements(By.CSS_SELECTOR, "#cps-overlay img")
                    if img.get_attribute("src")
                ),
                False,
            )
        )
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cps-legend .cps-legend-row") or False)
        wait.until(
            lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay)
        )
        assert overlay.get_attribute("src")
        assert len(rows) == num_labels
        legend_text = driver.find_element(By.ID, "cps-legend").text
        assert all(name in legend_text for name in SegmentationDemo.from_pretrained(model).class_names)
        assert "%" in legend_text
        assert "Measured on the model card" in driver.find_element(By.TAG_NAME, "body").text
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(screenshot))
        picture = np.asarray(Image.open(screenshot).convert("RGB"))
        assert picture.shape[0] > 500 and picture.std() > 10  # a rendered page, not a blank one
    finally:
        driver.quit()
        demo.close()
    # The server is gone: the port accepts connections no more.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        assert probe.connect_ex(("127.0.0.1", port)) != 0
