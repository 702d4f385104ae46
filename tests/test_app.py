"""Tests of fmboost_jax/app.py: the page's work (`Booster`) against the `Upsampler`, its
refusals, and the served page called through its API as scripts call it (gradio_client)."""

import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image
from support import ROOT, decompression_bomb

from fmboost_jax import app
from fmboost_jax.data import images as images_lib
from fmboost_jax.errors import UserError
from fmboost_jax.inference.upsampler import load_upsampler

OPTIONS = app.Options("euler", 2, seed=3)
BROWSER_INSTALL = "apt-get install -y chromium chromium-driver (Debian)"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A real photo crop (24x32), a text file named .png, a decompression bomb."""
    folder = tmp_path_factory.mktemp("uploads")
    Image.fromarray(skimage.data.astronaut()[100:124, 180:212]).save(folder / "face.png")
    (folder / "notes.png").write_text("not an image")
    (folder / "bomb.png").write_bytes(decompression_bomb(20_000, 20_000))
    return {p.stem: str(p) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def booster(tiny_workdir, tmp_path_factory):
    model = load_upsampler(tiny_workdir)
    return app.Booster(lambda dtype: model, out_dir=str(tmp_path_factory.mktemp("out")))


def upsampler_result(workdir, path, o, index=0, config=None):
    """What `Upsampler` makes of the image at `path` with `o` (image `index` of a boost)."""
    model = load_upsampler(workdir, config)
    x = images_lib.to_float(np.asarray(Image.open(path).convert("RGB")))[None]
    out = model(x, jax.random.fold_in(jax.random.PRNGKey(o.seed), index), solver=o.solver,
                num_steps=o.num_steps)
    return images_lib.to_uint8(np.asarray(out.images).clip(-1, 1))[0]


def test_a_boost_is_the_upsamplers_and_its_png_is_what_the_page_shows(booster, photos,
                                                                      tiny_workdir):
    assert booster.estimate([photos["face"]], OPTIONS) is None      # nothing measured yet
    (r,) = booster.boost([photos["face"]], OPTIONS)
    assert r.cfm.shape == (96, 128, 3) and r.bicubic.shape == r.cfm.shape and r.nfe == 2
    np.testing.assert_array_equal(r.cfm, upsampler_result(tiny_workdir, photos["face"], OPTIONS))
    np.testing.assert_array_equal(np.asarray(Image.open(r.png)), r.cfm)
    assert r.compile_seconds > 0 and r.seconds > r.compile_seconds
    # Measured now: the same boost again is expected at its run time, without a compile.
    expected = booster.estimate([photos["face"]], OPTIONS)
    assert expected is not None and 0 < expected < r.seconds
    (again,) = booster.boost([photos["face"]], OPTIONS)
    assert again.compile_seconds == 0.0
    np.testing.assert_array_equal(again.cfm, r.cfm)


def test_each_image_draws_the_noise_of_its_seed_and_index(smoke_params, photos):
    """A model whose source is noised (lhq:smoke): image i of an upload is boosted as
    `Upsampler` boosts it with `fold_in(PRNGKey(seed), i)`, as `upsample --batch_size 1` does."""
    model = load_upsampler(smoke_params, "lhq:smoke")
    smoke = app.Booster(lambda dtype: model)
    first, second = smoke.boost([photos["face"], photos["face"]], OPTIONS)
    np.testing.assert_array_equal(second.cfm, upsampler_result(smoke_params, photos["face"],
                                                               OPTIONS, 1, "lhq:smoke"))
    assert np.abs(first.cfm.astype(int) - second.cfm).max() > 0      # another draw


def test_large_inputs_are_boosted_in_tiles_counted_by_the_progress(booster, photos,
                                                                  tiny_workdir):
    tiled = app.Booster(lambda dtype: booster.model(dtype), tile=16, overlap=8)
    seen = []
    (r,) = tiled.boost([photos["face"]], OPTIONS, lambda i, n, what: seen.append((i, n, what)))
    assert [s[:2] for s in seen[1:]] == [(t, 6) for t in range(6)]       # 24x32: 2x3 tiles
    assert seen[-1][2] == "face.png, tile 6 of 6" and r.cfm.shape == (96, 128, 3)
    whole = upsampler_result(tiny_workdir, photos["face"], OPTIONS).astype(int)
    assert np.abs(r.cfm.astype(int) - whole).mean() < 3.5      # of 255 (measured 2.2 on 16 px)
    # The estimate counts six tile runs at the tile's measured rate (compiled now).
    run = tiled.rates.seconds("float32", 64 * 64, 2, True)
    assert tiled.estimate([photos["face"]], OPTIONS) == pytest.approx(6 * run)


def test_ground_truth_scores_cfm_and_bicubic_on_the_centre_crop(booster, photos):
    (r,) = booster.boost([photos["face"]], app.Options("euler", 2, ground_truth=True))
    assert r.truth.shape == r.cfm.shape == (24, 32, 3)            # the upload is the truth
    assert "CFM" in r.scores and "bicubic" in r.scores and "dB" in r.scores


@pytest.mark.parametrize("name,message", [
    ("notes", r"notes\.png: not a readable image"),
    ("bomb", r"bomb\.png: .*pixels"),
])
def test_files_that_are_not_usable_images_are_named_before_any_boost(booster, photos, name,
                                                                     message):
    with pytest.raises(UserError, match=message):
        booster.boost([photos["face"], photos[name]], OPTIONS)


def test_a_boost_over_the_time_limit_is_refused_before_it_runs(booster, photos):
    booster.boost([photos["face"]], OPTIONS)                      # a rate to estimate with
    strict = app.Booster(lambda dtype: booster.model(dtype), max_seconds=1e-6)
    strict.rates, strict.compiled = booster.rates, booster.compiled
    with pytest.raises(UserError, match=r"would take about .* over the page's limit"):
        strict.boost([photos["face"]], OPTIONS)
    assert "over the limit" in app.estimate_text(strict, [photos["face"]], "euler", 2, 0, 1.0,
                                                 "float32", False)
    with pytest.raises(UserError, match="no image"):
        booster.boost([], OPTIONS)


def test_the_expected_evaluations_follow_the_solver():
    assert app.evaluations("euler", 4, False, {}) == 4
    assert app.evaluations("heun", 4, True, {}) == 16            # guidance doubles them
    assert app.evaluations("sde_heun", 3, False, {}) == 7        # the last step adds one
    assert app.evaluations("dopri5", 4, False, {"dopri5": 25}) == 25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(tiny_workdir):
    """`python -m fmboost_jax.app` serving the tiny model on a free loopback port: its URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fmboost_jax.app", "--model", tiny_workdir,
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"))
    try:
        line, deadline = "", time.time() + 240
        while "fmboost_jax page:" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the app ended before serving"
            assert time.time() < deadline, "the page did not come up"
        assert f"http://127.0.0.1:{port}/" in line
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_page_serves_boosts_through_its_api_and_survives_a_bad_upload(page, tiny_workdir,
                                                                          photos, tmp_path):
    from gradio_client import Client, handle_file
    client = Client(page, verbose=False, download_files=str(tmp_path))
    args = ("euler", 2, OPTIONS.seed, 1.0, "float32", False)
    slider, gallery, figures, pngs = client.predict([handle_file(photos["face"])], *args,
                                                    api_name="/boost")
    assert "128×96 px, 2 NFE" in figures and len(gallery) == 1
    boosted = np.asarray(Image.open(pngs[0]))
    np.testing.assert_array_equal(boosted, upsampler_result(tiny_workdir, photos["face"],
                                                            OPTIONS))
    np.testing.assert_array_equal(np.asarray(Image.open(slider[1]).convert("RGB")), boosted)
    with pytest.raises(Exception, match=r"notes\.png: not a readable image"):
        client.predict([handle_file(photos["notes"])], *args, api_name="/boost")
    *_, pngs = client.predict([handle_file(photos["face"])], *args, api_name="/boost")
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[0])), boosted)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium (Debian's `chromium` and `chromium-driver`) driven by Selenium, saving
    downloads to its `downloads` folder."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        reason = f"needs a browser: {BROWSER_INSTALL}"
        if os.environ.get("FMBOOST_BROWSER_TESTS") == "required":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
    chrome.downloads = downloads
    yield chrome
    chrome.quit()


def _upload(browser, wait, path):
    """Clears the page's uploads and uploads `path` through the file input, as a drop does."""
    from selenium.webdriver.common.by import By
    for clear in browser.find_elements(By.CSS_SELECTOR, "#inputs button[aria-label='Clear']"):
        clear.click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#inputs input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#inputs input[type=file]").send_keys(path)


def _downloaded(folder, name, timeout=60):
    path, deadline = os.path.join(folder, name), time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline, f"{name} was not downloaded: {os.listdir(folder)}"
        time.sleep(0.2)
    return path


def test_a_person_boosts_a_photo_in_a_real_browser(page, browser, tiny_workdir, photos):
    """Upload, Boost, wait, download: 4x the upload and equal to the Upsampler's boost; a text
    file named .png shows its error on the page, and the next good upload still boosts."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    wait = WebDriverWait(browser, 180)
    text = lambda element_id: browser.find_element(By.ID, element_id).text
    browser.get(page)
    _upload(browser, wait, photos["face"])
    wait.until(lambda d: text("estimate").startswith(("Expected", "No estimate")))
    browser.find_element(By.ID, "boost").click()
    wait.until(lambda d: "NFE" in text("figures"))
    assert "face.png: 128×96 px, 2 NFE" in text("figures")
    shot = os.environ.get("FMBOOST_APP_SCREENSHOT")       # docs/app.png is made this way
    if shot:
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(shot)
    browser.find_element(By.CSS_SELECTOR, "#download a[download]").click()
    png = np.asarray(Image.open(_downloaded(browser.downloads, "face_128x96.png")))
    assert png.shape == (96, 128, 3)                              # 4x the 24x32 upload
    np.testing.assert_array_equal(png, upsampler_result(tiny_workdir, photos["face"],
                                                        app.Options("euler", 2)))   # seed 0

    _upload(browser, wait, photos["notes"])
    wait.until(lambda d: "not a readable image" in text("estimate"))
    browser.find_element(By.ID, "boost").click()
    # The toast's element appears before its text is drawn: wait for the text.
    toasts = wait.until(lambda d: [t.text for t in d.find_elements(By.CSS_SELECTOR, ".toast-body")
                                   if t.text])
    assert "notes.png: not a readable image" in toasts[0], toasts
    assert text("figures") == "" and not browser.find_elements(By.CSS_SELECTOR, "#download a")
    os.remove(os.path.join(browser.downloads, "face_128x96.png"))
    _upload(browser, wait, photos["face"])
    wait.until(lambda d: text("estimate").startswith("Expected"))
    browser.find_element(By.ID, "boost").click()
    wait.until(lambda d: "NFE" in text("figures"))       # cleared by the error, shown anew
    browser.find_element(By.CSS_SELECTOR, "#download a[download]").click()
    again = np.asarray(Image.open(_downloaded(browser.downloads, "face_128x96.png")))
    np.testing.assert_array_equal(again, png)


def test_without_gradio_the_page_says_what_to_install(tiny_workdir):
    code = ("import sys; sys.modules['gradio'] = None\n"
            "from fmboost_jax import app; app.console()")
    proc = subprocess.run([sys.executable, "-c", code, "--model", tiny_workdir], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert 'error: the page needs Gradio: pip install "gradio>=6.20,<7"' in proc.stderr
