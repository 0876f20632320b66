"""End-to-end: the playground page in a real headless Chromium against a real exitserve.

Usage: python tests/e2e/playground_e2e.py BINARY [SCREENSHOT_DIR]
For both fixtures (GPT-Neo, and GPT-2 behind an API key typed into the page): loads `/`, runs
the three default modes and checks each column's streamed text equals the same request's
non-stream completion (then DoLa, picked in a mode menu), that hovering a token shows its logprobs, that the layer view has a row
per head and a column per prompt token; then that a bad parameter and an overload (429) are
shown in the columns. Saves screenshots (the first is the README's) in SCREENSHOT_DIR
(default target/).
"""
import os
import sys
import threading
import time

import httpx
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from server import FIXTURE, GPT2_FIXTURE, GPT2_MODEL, MODEL, ROOT, multi_exit, running_server

PROMPT = "The quick brown fox jumps over"
API_KEY = "playground-secret"


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1100", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    # The console, to check that a page load logs no error (a missing icon was one).
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The distribution's driver, named explicitly: nothing is downloaded.
    service = webdriver.ChromeService(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(options=opts, service=service)


def wait_state(driver, want, timeout=60):
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.state") == want,
        f"page never reached state {want!r}")


def text_of(driver, element):
    # textContent, not .text: the columns keep whitespace exactly (pre-wrap).
    return driver.execute_script("return arguments[0].textContent", element)


def set_value(driver, element_id, value):
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('change'));", element_id, value)


def run_page(driver):
    driver.execute_script("document.body.dataset.state = 'running'")
    driver.find_element(By.ID, "run").click()
    wait_state(driver, "done")


def check_columns_match_api(driver, base, model, headers, card):
    columns = driver.find_elements(By.CSS_SELECTOR, "[data-mode]")
    modes = [c.get_attribute("data-mode") for c in columns]
    exits = card["exit_layers"]
    half = max([l for l in exits if l <= card["num_layers"] / 2] or exits[:1])
    top = exits[-1] if exits[-1] == card["num_layers"] else "original"
    assert modes == ["original", f"exit:{half}", f"contrast:{top},{half}"], modes
    errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".column .error") if e.text]
    assert not errors, errors
    texts = {}
    for col, mode in zip(columns, modes):
        body = {"model": model, "prompt": PROMPT, "max_tokens": 32, "temperature": 0, "top_p": 1,
                "logprobs": 5, "multi_exit": multi_exit(mode, alpha=0.1)}
        r = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        want = r.json()["choices"][0]["text"]
        got = text_of(driver, col)
        assert got == want, f"{mode}: page {got!r} != api {want!r}"
        assert want, f"{mode}: empty completion"
        texts[mode] = got
    assert len(set(texts.values())) > 1, f"the modes wrote the same text: {texts}"
    return columns


def check_hover(driver, columns):
    token = columns[0].find_element(By.CSS_SELECTOR, ".tok")
    ActionChains(driver).move_to_element(token).perform()
    tip = driver.find_element(By.ID, "tooltip")
    WebDriverWait(driver, 5).until(lambda d: tip.is_displayed())
    assert "logprob" in tip.text and tip.text.count("\n") >= 5, tip.text


def check_layers(driver, base, model, headers, card):
    tok = httpx.post(f"{base}/tokenize", json={"prompt": PROMPT}, headers=headers, timeout=30).json()
    rows = driver.find_elements(By.CSS_SELECTOR, "#layers table tr")
    heads = [r.find_element(By.TAG_NAME, "th").text for r in rows[1:]]
    want = [f"exit:{l}" for l in card["exit_layers"]] + ["original"]
    assert heads[:len(want)] == want and len(heads) == len(want) + 1, heads
    assert heads[-1].startswith("contrast:"), heads
    cells = rows[1].find_elements(By.TAG_NAME, "td")
    assert len(cells) == tok["count"], (len(cells), tok["count"])


def check_strategy(driver, base, model, headers, card, kind, key, multi_exit):
    """Mode 3 switched to a strategy in its menu (`kind`, over every exit below the top): its
    column shows `key` and equals the API's completion with `multi_exit`."""
    driver.execute_script(
        "const s = document.querySelector('#mode-pickers .picker:nth-child(3) select');"
        f"s.value = '{kind}'; s.dispatchEvent(new Event('change'));")
    run_page(driver)
    column = driver.find_elements(By.CSS_SELECTOR, "[data-mode]")[2]
    assert column.get_attribute("data-mode") == key, column.get_attribute("data-mode")
    body = {"model": model, "prompt": PROMPT, "max_tokens": 32, "temperature": 0, "top_p": 1,
            "logprobs": 5, "multi_exit": multi_exit}
    r = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    want, got = r.json()["choices"][0]["text"], text_of(driver, column)
    assert want and got == want, f"{kind}: page {got!r} != api {want!r}"
    if kind == "early_exit":
        shaded = column.find_elements(By.CSS_SELECTOR, "span.tok[data-exit-layer]")
        assert shaded, "early exit: no token shows the layer it left at"
    driver.execute_script(
        "const s = document.querySelector('#mode-pickers .picker:nth-child(3) select');"
        "s.value = 'contrast'; s.dispatchEvent(new Event('change'));")


def check_strategies(driver, base, model, headers, card):
    below = [l for l in card["exit_layers"] if l < card["num_layers"]]
    check_strategy(driver, base, model, headers, card, "dola", "dola:" + "-".join(map(str, below)),
                   {"mode": "dola", "layers": below, "premature": "exits"})
    check_strategy(driver, base, model, headers, card, "sled", "sled",
                   {"mode": "sled", "premature": "exits"})
    check_strategy(driver, base, model, headers, card, "early_exit", "early_exit:0.9",
                   {"mode": "early_exit", "threshold": 0.9})


def check_console_clean(driver):
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"the page logged errors: {errors}"
    icon = driver.execute_script(
        "return fetch('/favicon.ico').then(r => r.status + ' ' + r.headers.get('content-type'))")
    assert icon == "200 image/svg+xml", icon


def check_errors(driver):
    set_value(driver, "temperature", "7")
    run_page(driver)
    errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".column .error")]
    assert len(errors) == 3 and all("HTTP 400" in e and "temperature" in e for e in errors), errors
    set_value(driver, "temperature", "0")


def check_overload(driver, base, model, shots):
    """Floods a server whose batch and queue hold one request each; the page's requests meet a
    full queue and each column shows the 429 and when to retry."""
    stop = threading.Event()

    def flood():
        body = {"model": model, "prompt": PROMPT, "max_tokens": 64, "ignore_eos": True}
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                c.post(f"{base}/v1/completions", json=body)

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for _ in range(20):
            run_page(driver)
            errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".column .error")]
            busy = [e for e in errors if "HTTP 429" in e]
            if busy:
                break
        else:
            raise AssertionError(f"no 429 reached the page in 20 runs: {errors}")
        assert all("rate_limit_error" in e and "retry after 1 s" in e for e in busy), busy
        driver.save_screenshot(os.path.join(shots, "playground-429.png"))
    finally:
        stop.set()
        for t in threads:
            t.join()


def exercise(driver, binary, fixture, model, shots, key=None):
    extra = ["--api-key", key] if key else []
    with running_server(binary, *extra, fixture=fixture) as server:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        card = httpx.get(f"{server.base}/v1/models/{model}", headers=headers, timeout=10).json()
        driver.get(server.base + "/")
        if key:
            wait_state_error = "401" in WebDriverWait(driver, 30).until(
                lambda d: d.find_element(By.ID, "global-error").text)
            assert wait_state_error, "the page did not show the 401"
            set_value(driver, "api-key", key)
        wait_state(driver, "ready")
        set_value(driver, "prompt", PROMPT)
        run_page(driver)
        columns = check_columns_match_api(driver, server.base, model, headers, card)
        check_hover(driver, columns)
        check_layers(driver, server.base, model, headers, card)
        check_strategies(driver, server.base, model, headers, card)
        if not key:
            # Before the errors this test provokes on purpose (a 400, a 429; the 401 above).
            check_console_clean(driver)
        driver.save_screenshot(os.path.join(shots, f"playground-{model}.png"))
        check_errors(driver)
    print(f"playground e2e: {model}: three modes, DoLa, SLED and early exit equal the API, hover, layer view, clean console, 400 shown")


def main():
    binary = sys.argv[1]
    shots = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "target")
    os.makedirs(shots, exist_ok=True)
    driver = browser()
    try:
        exercise(driver, binary, FIXTURE, MODEL, shots)
        exercise(driver, binary, GPT2_FIXTURE, GPT2_MODEL, shots, key=API_KEY)
        with running_server(binary, "--max-batch-size", "1", "--max-queued-requests", "1") as server:
            driver.get(server.base + "/")
            wait_state(driver, "ready")
            check_overload(driver, server.base, MODEL, shots)
        print("playground e2e: overload 429 shown")
    finally:
        driver.quit()
    print("playground e2e: all checks passed")


if __name__ == "__main__":
    main()
