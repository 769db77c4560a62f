"""The web page at `/` in a real browser (Debian's headless Chromium driven by selenium), and the
`tts` / `thinking_budget` request extras over HTTP: one server on a tiny random-weight model.

The browser test loads the page, sends a message, sees the reply stream in (the bubble's text is
seen at several lengths before it ends) and sees the metrics panel update from /metrics."""
from __future__ import annotations

import shutil
import tempfile

import httpx
import pytest

from server_helpers import ServerProcess, build_tiny_model, openai_error, post

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_tiny_model(tmp_path_factory.mktemp("tiny-ui"))
    srv = ServerProcess(model=str(model), options=dict(dtype="float32", max_model_len=512, block_size=16,
                                                       enable_prefix_caching=True, max_num_seqs=16))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


# ---------------- request extras ----------------
def test_tts_extra_returns_the_chosen_sample_and_every_sample(server):
    body = {"messages": [{"role": "user", "content": "pick a number"}], "max_tokens": 12, "temperature": 1.0,
            "seed": 3, "tts": {"strategy": "best_of_n", "n": 5}}
    resp = post(server, "/v1/chat/completions", body, {})
    assert resp.status_code == 200, resp.text
    data = resp.json()
    tts = data["tts"]
    assert tts["strategy"] == "best_of_n" and len(tts["samples"]) == 5
    best = max(tts["samples"], key=lambda s: s["mean_logprob"])
    assert tts["chosen_index"] == best["index"]
    assert data["choices"][0]["message"]["content"] == best["text"]
    assert data["usage"]["completion_tokens"] == sum(s["num_tokens"] for s in tts["samples"])

    votes = post(server, "/v1/completions", {"prompt": ["1 2 3", "4 5 6"], "max_tokens": 8, "temperature": 1.0,
                                             "tts": {"strategy": "self_consistency", "n": 4,
                                                     "prune": {"margin": 0.5, "min_tokens": 2}}}, {})
    assert votes.status_code == 200, votes.text
    assert [len(t["samples"]) for t in votes.json()["tts"]] == [4, 4]


@pytest.mark.parametrize("extra, field", [
    ({"tts": {"strategy": "nope"}}, "tts.strategy"),
    ({"tts": {"strategy": "best_of_n"}, "n": 3}, "tts.n"),
    ({"tts": {"strategy": "best_of_n"}, "stream": True}, "do not stream"),
    ({"tts": {"strategy": "repeated_sampling"}}, "verifier"),
    ({"thinking_budget": -1}, "thinking_budget"),
])
def test_bad_tts_requests_are_400s_naming_the_problem(server, extra, field):
    resp = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 4, **extra}, {})
    assert field in openai_error(resp, 400)["message"]


def test_thinking_budget_over_http(server):
    body = {"prompt": "think", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "thinking_budget": 4,
            "thinking_end": "END", "skip_special_tokens": False}
    resp = post(server, "/v1/completions", body, {})
    assert resp.status_code == 200, resp.text
    assert "END" in resp.json()["choices"][0]["text"]
    assert resp.json()["usage"]["completion_tokens"] >= 4 + 3


# ---------------- the page in a browser ----------------
def test_page_is_served_with_its_assets(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="/static/app.js"' in page.text and "http" not in page.text.replace("http-equiv", "")
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(server.url + asset).status_code == 200
    assert httpx.get(server.url + "/static/../api_server.py").status_code == 404


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium / chromedriver not installed (scripts/install.sh --test)")
def test_chat_streams_and_metrics_update_in_a_browser(server):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tempfile.mkdtemp(prefix="kvflow-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1200,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        wait = WebDriverWait(driver, 10, poll_frequency=0.05)
        driver.get(server.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "m-status").text == "up")
        tokens_before = float(driver.find_element(By.ID, "m-tokens").text)
        max_tokens = driver.find_element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("200")
        driver.find_element(By.ID, "prompt").send_keys("Hello there")
        # Every text the reply bubble shows, recorded in the page as it renders (polling from here
        # can miss a fast reply's intermediate states).
        driver.execute_script("""
            window.__replyLengths = [];
            new MutationObserver(() => {
              const b = document.querySelector('.msg.assistant');
              if (b && b.firstChild) window.__replyLengths.push(b.firstChild.textContent.length);
            }).observe(document.body, {subtree: true, childList: true, characterData: true});""")
        driver.find_element(By.ID, "send").click()

        bubble = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant"))
        wait.until(lambda d: "streaming" not in (bubble.get_attribute("class") or ""))
        lengths = set(driver.execute_script("return window.__replyLengths"))
        assert len(lengths - {0}) >= 2, f"the reply should arrive in pieces, saw lengths {sorted(lengths)}"
        assert driver.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text  # tokens, time, finish reason
        wait.until(lambda d: float(d.find_element(By.ID, "m-tokens").text) > tokens_before)
        assert driver.find_element(By.ID, "m-tps").text not in ("", "–")
        assert driver.find_element(By.ID, "m-kv").text.endswith("%")
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
