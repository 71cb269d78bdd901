"""The web page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Upload an image, run two different models in turn, load a sample with its clean reference, switch to
a classical method, zoom and swipe, and check every result appears, nothing is fetched from outside
the app, and the page logs no errors. Leaves a screenshot at ``test-artifacts/web.png``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import free_port, save_tiny_model, wait_until_up

from semray.config.serve import ServeConfig
from semray.serve import SAMPLES_DIR, samples_index

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 60_000  # per step; the CI machine's 2 cores are shared


@pytest.fixture(scope="module")
def app_url(ray_local, tmp_path_factory):
    from ray import serve

    from semray.serve import start

    models = tmp_path_factory.mktemp("web_models")
    for i, name in enumerate(("alpha", "beta")):
        card = {"name": name, "version": str(i + 1), "metrics": {"val_psnr": 31.5 + i}}
        save_tiny_model(models / name, card, seed=200 + i)
    cfg = ServeConfig(
        port=free_port(),
        models_dir=models,
        include_mlflow=False,
        autoscaling={"min_replicas": 1, "max_replicas": 1},
    )
    url = start(cfg)
    assert wait_until_up(url + "api/health"), f"the app at {url} did not answer within 60 s"
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the web test needs Debian's chromium. Run `make install-browser` "
            "(apt-get install -y chromium) and try again."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def history_names(page) -> list[str]:
    return [t.strip() for t in page.locator("#history .h-name").all_inner_texts()]


@pytest.mark.ray
@pytest.mark.slow
def test_page_upload_two_models_sample_and_screenshot(app_url, browser):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)  # expect() has its own 5 s default; page timeouts don't reach it
    problems: list[str] = []
    outside: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on(
        "request",
        lambda r: None if r.url.startswith((app_url, "data:", "blob:")) else outside.append(r.url),
    )
    page.goto(app_url)
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("#health-text")).to_contain_text("online")
    # the model list comes from /api/models: both networks and every classical method
    values = page.locator("#model-select option").evaluate_all("opts => opts.map(o => o.value)")
    assert {"unet|alpha", "unet|beta", "method|bm3d", "method|tv"} <= set(values)
    expect(page.locator("button.sample")).to_have_count(len(samples_index()))

    # 1. upload an image with model alpha
    page.select_option("#model-select", "unet|alpha")
    expect(page.locator("#model-card")).to_contain_text("val_psnr")
    rec = samples_index()["contacts"]
    page.set_input_files("#image-input", str(SAMPLES_DIR / rec["noisy_file"]))
    expect(page.locator("#history li")).to_have_count(1)
    expect(page.locator("#result-model")).to_contain_text("alpha")
    expect(page.locator("#result-format")).to_contain_text("PNG · uint16 · 256×256")
    expect(page.locator("#metrics-hint")).to_be_visible()
    first_src = page.locator("#img-denoised").get_attribute("src")

    # 2. switch to model beta: runs again on the same image, different output
    page.select_option("#model-select", "unet|beta")
    expect(page.locator("#history li")).to_have_count(2)
    expect(page.locator("#result-model")).to_contain_text("beta")
    second_src = page.locator("#img-denoised").get_attribute("src")
    assert first_src.startswith("data:image/png;base64,") and second_src != first_src
    assert history_names(page) == ["beta", "alpha"]
    # the history restores an earlier result
    page.locator("#history li").nth(1).click()
    expect(page.locator("#result-model")).to_contain_text("alpha")
    assert page.locator("#img-denoised").get_attribute("src") == first_src

    # 3. a shipped sample brings its clean reference: metrics appear
    page.locator("button.sample[data-sample=tin_balls]").click()
    expect(page.locator("#history li")).to_have_count(3)
    expect(page.locator("#metrics-wrap")).to_be_visible()
    expect(page.locator("#metrics tr[data-metric=psnr]")).to_be_visible()
    expect(page.locator("#result-format")).to_contain_text("TIFF · uint16")
    expect(page.locator("#clean-panel")).to_be_visible()

    # 4. a classical method on the same sample
    page.select_option("#model-select", "method|tv")
    expect(page.locator("#history li")).to_have_count(4)
    expect(page.locator("#result-model")).to_contain_text("tv")
    psnr_cells = page.locator("#metrics tr[data-metric=psnr] td").all_inner_texts()
    noisy_psnr, tv_psnr = float(psnr_cells[1]), float(psnr_cells[2])
    assert tv_psnr > noisy_psnr  # total variation does remove noise from this sample
    expect(page.locator("#download")).to_have_attribute("download", "tin_balls_noisy_denoised.tif")
    expect(page.locator("#result-time")).to_have_text(re.compile(r"^\d+(\.\d+)? m?s$"))

    # zoom buttons and wheel, and the swipe divider
    before = page.locator("#zoom-level").inner_text()
    page.click("#zoom-in")
    after = page.locator("#zoom-level").inner_text()
    assert int(after.rstrip("%")) > int(before.rstrip("%"))
    box = page.locator("#compare").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.45)
    page.mouse.wheel(0, -240)
    expect(page.locator("#zoom-level")).not_to_have_text(after)
    handle = page.locator("#handle")
    hb = handle.bounding_box()
    page.mouse.move(hb["x"] + hb["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.35, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    split = int(handle.get_attribute("aria-valuenow"))
    assert 30 <= split <= 40
    clip = page.locator("#compare-top").evaluate("e => e.style.clipPath")
    assert clip.startswith("inset(0px 0px 0px 3") or clip.startswith("inset(0 0 0 3")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web.png"))
    assert (ARTIFACTS / "web.png").stat().st_size > 10_000
    assert not outside, f"the page fetched from outside the app: {outside}"
    assert not problems, problems
    page.close()


@pytest.mark.ray
@pytest.mark.slow
def test_page_shows_server_errors(app_url, browser, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page.goto(app_url)
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"these are notes, not an image")
    page.select_option("#model-select", "method|gaussian")
    page.set_input_files("#image-input", str(bad))
    expect(page.locator("#toast")).to_be_visible()
    expect(page.locator("#toast")).to_contain_text("415")
    expect(page.locator("#history li")).to_have_count(0)
    page.close()
