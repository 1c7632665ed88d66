"""The playground page at /sjd, driven in a real headless Chromium.

`vllm-sjd serve` on the bundled demo model with --api-key; the browser opens
the page, types the key and a prompt, and watches the image arrive through the
streaming images API. Chromium and ChromeDriver come from Debian's packages
(scripts/install-cpu.sh installs them where it can).
"""

import base64
import io
import shutil

import pytest
import requests
from PIL import Image

from tests.server import vllm_server
from vllm_sjd.image_generation import NEUTRAL_GREY

pytestmark = pytest.mark.engine

API_KEY = "playground-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("playground") / "server.log"
    args = ["--max-model-len", "512", "--api-key", API_KEY]
    with vllm_server(None, args, log, launcher="vllm-sjd") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no Chromium and ChromeDriver: scripts/install-cpu.sh installs them as root")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_loads_without_the_key_and_knows_the_model(server):
    page = requests.get(f"{server}/sjd", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '"model": "vllm-sjd-demo"' in page.text and '"api_key_required": true' in page.text
    assert API_KEY not in page.text  # the page asks for the key; it never carries it
    # The route the page calls stays guarded.
    assert requests.post(f"{server}/v1/images/generations", json={"prompt": "x"},
                         timeout=10).status_code == 401


def test_a_prompt_draws_partial_images_then_the_seeded_image(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/sjd")
    find = lambda id_: browser.find_element(By.ID, id_)  # noqa: E731
    assert find("model").text == "vllm-sjd-demo" and find("method").text == "SJD"
    assert find("api-key").is_displayed()
    sizes = [o.text for o in find("size").find_elements(By.TAG_NAME, "option")]
    assert "64x64" in sizes and "96x40" in sizes  # the demo's size buckets
    assert find("size").get_attribute("value") == "64x64"  # its default
    assert find("guidance").get_attribute("value") == "3"
    # Every picture the page shows, in order.
    browser.execute_script("""
        window.shown = [];
        new MutationObserver(() => window.shown.push(document.getElementById('image').src))
            .observe(document.getElementById('image'), {attributes: true, attributeFilter: ['src']});
    """)
    prompt = "a large red square on the left on a white background"
    find("api-key").send_keys(API_KEY)
    find("prompt").clear()
    find("prompt").send_keys(prompt)
    find("seed").send_keys("11")
    find("generate").click()
    WebDriverWait(browser, 120).until(lambda b: find("status").text in ("done",) or
                                      find("status").get_attribute("class") == "error")
    assert find("status").text == "done"

    shown = [_image(src) for src in browser.execute_script("return window.shown")]
    partials, final = shown[:-1], shown[-1]
    assert 1 <= len(partials) <= 3 and int(find("partials").text) == len(partials)
    # A partial image has rows not drawn yet, neutral grey; the final one has none.
    assert partials[0].getpixel((0, 63)) == NEUTRAL_GREY
    assert final.size == (64, 64) and _grey_rows(final) < 4
    # The page's request was the seeded one: the same image as the API's.
    answer = requests.post(
        f"{server}/v1/images/generations", headers={"Authorization": f"Bearer {API_KEY}"},
        json={"prompt": prompt, "seed": 11, "guidance_scale": 3}, timeout=120,
    ).json()["data"][0]
    assert final.tobytes() == _image("data:," + answer["b64_json"]).tobytes()
    passes, tokens = int(find("forward-passes").text), int(find("tokens").text)
    assert tokens == answer["sjd"]["tokens"] == 16 * 17 + 1 and passes < tokens
    assert float(find("seconds").text) > 0


def test_a_wrong_key_shows_the_servers_refusal(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/sjd")
    find = lambda id_: browser.find_element(By.ID, id_)  # noqa: E731
    find("api-key").clear()
    find("api-key").send_keys("not-the-key")
    find("generate").click()
    WebDriverWait(browser, 30).until(lambda b: find("status").get_attribute("class") == "error")
    assert find("status").text.startswith("401")
    assert find("figures").get_attribute("hidden") is not None


def _image(data_url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")


def _grey_rows(image: Image.Image) -> int:
    width, height = image.size
    return sum(all(image.getpixel((x, y)) == NEUTRAL_GREY for x in range(width))
               for y in range(height))
