"""The web console in a real headless chromium against `clowder up --demo`: sign-in (form, #token fragment, a
wrong token), the overview, scaling smol to 2 and back, a streamed chat, API keys, errors in the page, keyboard
use, and a lost connection shown and recovered.

One cluster and one browser for the module (a cluster start is most of the run time); the tests run in file
order and each leaves the cluster as it found it (smol at one ready replica).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from clowder_common.auth import read_admin_token

from browser_helpers import browser_errors, screenshot, start_chromium, wait_until
from cluster_helpers import up_cluster

pytestmark = [pytest.mark.processes, pytest.mark.e2e]

# A second runtime loads the model and registers within seconds here; generous for a loaded 2-core machine.
REPLICA_READY_S = 180


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with up_cluster(tmp_path_factory.mktemp("clowder"), wide_console=False) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def token(cluster) -> str:
    return read_admin_token(cluster.data_dir)


@pytest.fixture(scope="module")
def base(cluster) -> str:
    return f"http://127.0.0.1:{cluster.http_port}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start_chromium(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()


@pytest.fixture
def signed_in(browser, base, token):
    """The console on its overview, signed in through the fragment (the quickest way a script signs in)."""
    browser.get_log("browser")  # what earlier tests left (a refused sign-in logs its 401)
    browser.get(f"{base}/console/#token={token}")
    wait_until(browser, lambda d: _text(d, "#page-title") == "Overview", 30, "the overview")
    yield browser
    assert browser_errors(browser) == []


# Read in one script call: the page rebuilds rows as it polls, and a WebElement held across polls goes stale.
def _text(driver, css: str) -> str:
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css)


def _rows(driver, tbody_id: str) -> list[list[str]]:
    return driver.execute_script(
        "return [...document.querySelectorAll(`#${arguments[0]} tr[data-key]`)]"
        ".map(tr => [...tr.children].map(td => td.innerText.trim()))", tbody_id)


def _alert(driver, box_id: str) -> str:
    return _text(driver, f"#{box_id}")


def _stored_token(driver) -> str | None:
    return driver.execute_script("return sessionStorage.getItem('clowder.adminToken')")


def _get(url: str, key: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_wrong_token_is_refused(browser, base):
    browser.get(f"{base}/console")  # the bare path redirects to /console/
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    field = wait_until(browser, lambda d: d.find_element(By.ID, "token"), 30, "the sign-in form")
    # The field has a visible label naming it.
    assert browser.find_element(By.CSS_SELECTOR, "label[for=token]").text.startswith("Admin token")
    field.send_keys("not-the-admin-token", Keys.ENTER)
    wait_until(browser, lambda d: "refused" in _alert(d, "signin-error"), 30, "the refusal")
    assert "invalid bearer token" in _alert(browser, "signin-error")
    assert _stored_token(browser) is None
    assert not browser.find_element(By.ID, "nav").is_displayed()
    screenshot(browser, "signin-refused")


def test_clowder_up_prints_where_the_console_is(cluster, base):
    assert f"web console on {base}/console/" in cluster.text


def test_fragment_token_signs_in_and_leaves_the_address_bar(browser, base, token):
    browser.get(f"{base}/console/#token={token}")
    wait_until(browser, lambda d: _text(d, "#page-title") == "Overview", 30, "the overview")
    assert token not in browser.current_url
    assert browser.current_url.endswith("/console/#/overview")
    assert _stored_token(browser) == token
    # Kept in this tab only: nothing in localStorage or cookies.
    assert browser.execute_script("return localStorage.length") == 0
    assert browser.get_cookies() == []


def test_overview_shows_the_node_and_smol_ready(signed_in):
    browser = signed_in
    nodes = wait_until(browser, lambda d: _rows(d, "nodes-body"), 30, "the node row")
    assert nodes[0][0] == "local"
    assert int(nodes[0][1]) >= 1  # CPUs
    assert "1 model" in nodes[0][5]  # the bundled model's layer sits in the node's store
    deployments = wait_until(browser, lambda d: _rows(d, "deployments-body"), 30, "the deployments")
    assert deployments[0][0] == "smol" and deployments[0][2] == "1/1"
    # The load cards fill from runtime-stats within a poll or two.
    wait_until(browser, lambda d: _text(d, "#stat-tps") not in ("", "—"), 30, "the tokens/s card")
    screenshot(browser, "overview")


def _focused_name(driver) -> str:
    return driver.execute_script(
        "const e = document.activeElement;"
        "return e.innerText.trim() || e.getAttribute('aria-label') || e.id || e.tagName")


def _press(driver, *keys: str) -> None:
    """Keys as a person types them, to whatever has the focus (no element reference to go stale)."""
    actions = ActionChains(driver)
    if keys[0] == Keys.SHIFT:
        actions.key_down(Keys.SHIFT).send_keys(*keys[1:]).key_up(Keys.SHIFT)
    else:
        actions.send_keys(*keys)
    actions.perform()


def test_keyboard_reaches_every_control_and_opens_a_deployment(signed_in):
    browser = signed_in
    wait_until(browser, lambda d: _rows(d, "deployments-body"), 30, "the deployments")
    # A page starts with the focus on its heading: Shift+Tab walks back to the skip link, Tab forward to the table.
    assert browser.execute_script("return document.activeElement.id") == "page-title"
    reached = []
    for _ in range(10):
        _press(browser, Keys.SHIFT, Keys.TAB)
        reached.append(_focused_name(browser))
        if reached[-1] == "Skip to content":
            break
    for _ in range(12):
        _press(browser, Keys.TAB)
        reached.append(_focused_name(browser))
        if reached[-1] == "smol":
            break
    for name in ("Skip to content", "Overview", "Images", "Playground", "API keys", "Sign out", "smol"):
        assert name in reached, f"{name!r} not reached by keyboard: {reached}"
    _press(browser, Keys.ENTER)
    wait_until(browser, lambda d: _text(d, "#page-title") == "Deployment smol", 30, "the deployment page")
    # Focus moved to the new page's heading, so the next Tab continues from there.
    assert browser.execute_script("return document.activeElement.id") == "page-title"
    # The playground's inputs: each labelled, each reachable with Tab.
    browser.get(browser.current_url.split("#")[0] + "#/playground")
    wait_until(browser, lambda d: _text(d, "#page-title") == "Playground", 30, "the playground")
    ids = []
    for _ in range(10):
        _press(browser, Keys.TAB)
        ids.append(browser.execute_script("return document.activeElement.id"))
    for control in ("pg-model", "pg-temperature", "pg-max-tokens", "pg-key", "pg-prompt", "pg-send"):
        assert control in ids, f"{control} not reached by Tab: {ids}"
        assert browser.find_elements(By.CSS_SELECTOR, f"label[for={control}]") or control == "pg-send"


def test_scale_smol_to_two_and_back(signed_in, base):
    browser = signed_in
    browser.get(f"{base}/console/#/deployment/smol")
    wait_until(browser, lambda d: len(_rows(d, "replicas-body")) == 1, 30, "smol's replica")
    # The runtime's own figures, from GET /api/v1/runtime-stats.
    wait_until(browser, lambda d: _rows(d, "replicas-body")[0][7].endswith("%"), 30, "KV cache use")
    browser.find_element(By.ID, "scale-up").click()

    def two_ready(d):
        rows = _rows(d, "replicas-body")
        return len(rows) == 2 and all(r[2] == "ready" for r in rows) and rows

    rows = wait_until(browser, two_ready, REPLICA_READY_S, "both replicas ready")
    assert {r[1] for r in rows} == {"local"} and all(r[4].startswith("127.0.0.1:") for r in rows)
    wait_until(browser, lambda d: "2 of 2 replicas ready" in _text(d, "#deployment-summary"), 30, "2 of 2 ready")
    wait_until(browser, lambda d: all(r[5] == "0" for r in _rows(d, "replicas-body")), 30, "both replicas' stats")
    events = _rows(browser, "events-body")
    assert any(e[1] == "scaled" for e in events) or any(e[1] == "ready" for e in events), events
    assert len(browser.find_elements(By.CSS_SELECTOR, "#charts svg polyline")) == 2
    screenshot(browser, "deployment-two-replicas")
    browser.find_element(By.ID, "scale-down").click()
    wait_until(browser, lambda d: len(_rows(d, "replicas-body")) == 1, 120, "back to one replica")


def test_playground_streams_a_reply(signed_in, base):
    browser = signed_in
    browser.get(f"{base}/console/#/playground")
    wait_until(browser, lambda d: "smol" in [o.text for o in Select(d.find_element(By.ID, "pg-model")).options],
               30, "smol in the model picker")
    Select(browser.find_element(By.ID, "pg-model")).select_by_value("smol")
    for field, value in (("pg-temperature", "0"), ("pg-max-tokens", "32")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    # Every change of the reply's text is recorded in the page, so streaming is seen even between polls.
    browser.execute_script("""
        window.__lengths = [];
        new MutationObserver(() => {
          const reply = document.querySelector('.msg-assistant .text');
          if (reply) window.__lengths.push(reply.textContent.length);
        }).observe(document.getElementById('pg-transcript'), {subtree: true, childList: true, characterData: true});
    """)
    browser.find_element(By.ID, "pg-prompt").send_keys("Write a short poem about the sea.")
    browser.find_element(By.ID, "pg-send").click()
    # Bounded for a loaded 2-core machine, where the 135M model may decode at only a few tokens a second.
    wait_until(browser, lambda d: "completion tokens" in _text(d, "#pg-stats"), 180, "the usage line")
    reply = _text(browser, ".msg-assistant .text")
    assert reply.strip()
    lengths = [n for n in browser.execute_script("return window.__lengths") if n > 0]
    assert len(set(lengths)) >= 2, f"the reply arrived in one piece: {lengths}"
    stats = _text(browser, "#pg-stats")
    assert "Time to first token" in stats and "prompt +" in stats, stats
    assert _alert(browser, "pg-error") == ""
    screenshot(browser, "playground")
    # The tokens just generated show in the deployment's load chart (the history survives page changes).
    browser.get(f"{base}/console/#/deployment/smol")
    tokens_chart = "const s = document.querySelectorAll('#charts svg')[1]; return s ? s.getAttribute('aria-label') : ''"

    def peak(d) -> float:
        found = re.search(r"at most ([\d.]+)", d.execute_script(tokens_chart))
        return float(found.group(1)) if found else 0.0

    wait_until(browser, lambda d: peak(d) > 0, 30, "tokens/s in the chart")
    screenshot(browser, "deployment-chart")


def test_runtime_stats_route(base, token):
    """GET /api/v1/runtime-stats, the one route added for the console: admin token, each ready replica's figures."""
    def get(key):
        request = urllib.request.Request(f"{base}/api/v1/runtime-stats?deployment=smol",
                                         headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    assert get("")[0] == 401
    status, body = get("wrong")
    assert status == 401 and body["message"] == "invalid bearer token"
    status, body = get(token)
    assert status == 200
    [replica] = body["replicas"]
    assert replica["deployment"] == "smol" and replica["reachable"] is True
    assert replica["slots"] >= 1 and 0 <= replica["kvCacheUsage"] <= 1
    assert int(replica["generationTokensTotal"]) > 0  # the playground's chat


def test_create_and_revoke_an_api_key(signed_in, base):
    browser = signed_in
    browser.get(f"{base}/console/#/keys")
    wait_until(browser, lambda d: _text(d, "#page-title") == "API keys", 30, "the keys page")
    browser.find_element(By.ID, "key-description").send_keys("console test")
    browser.find_element(By.ID, "key-groups").send_keys("team-a, batch")
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    secret = wait_until(browser, lambda d: _text(d, "#new-key-secret"), 30, "the new key's secret")
    assert secret.startswith("ck-")
    key_id = secret.split("-")[1]
    rows = wait_until(browser, lambda d: [r for r in _rows(d, "keys-body") if r[0] == key_id], 30, "the key's row")
    assert rows[0][1] == "console test" and rows[0][2] == "batch, team-a"
    screenshot(browser, "api-keys")
    assert _get(f"{base}/v1/models", secret) == 200
    # Shown once: after leaving the page the secret is nowhere in it.
    browser.get(f"{base}/console/#/overview")
    browser.get(f"{base}/console/#/keys")
    wait_until(browser, lambda d: [r for r in _rows(d, "keys-body") if r[0] == key_id], 30, "the key's row again")
    assert secret not in browser.page_source
    browser.find_element(By.CSS_SELECTOR, f"button[aria-label='Revoke key {key_id}']").click()
    browser.find_element(By.CSS_SELECTOR, f"button[aria-label='Really revoke key {key_id}']").click()
    wait_until(browser, lambda d: not [r for r in _rows(d, "keys-body") if r[0] == key_id], 30, "the row gone")
    # Revocation reaches the balancer's key cache through an etcd watch: a moment, bounded.
    deadline = time.monotonic() + 10
    while _get(f"{base}/v1/models", secret) != 401:
        assert time.monotonic() < deadline, "the revoked key is still accepted"
        time.sleep(0.2)


def test_api_errors_are_shown_in_the_page(signed_in, base):
    browser = signed_in
    browser.get(f"{base}/console/#/images")
    wait_until(browser, lambda d: [r for r in _rows(d, "images-body") if r[0] == "smol"], 30, "smol's image")
    assert "application/vnd.clowder.model.layer.v1+gguf" in _rows(browser, "images-body")[0]
    screenshot(browser, "images")
    browser.find_element(By.ID, "image-alias").send_keys("Not An Alias!")
    browser.find_element(By.ID, "image-source").send_keys("file:///nowhere.gguf", Keys.ENTER)
    wait_until(browser, lambda d: _alert(d, "images-error").startswith("400"), 30, "the API's error")
    assert "alias" in _alert(browser, "images-error")
    # A deployment that does not exist: its page says so instead of staying blank.
    browser.get(f"{base}/console/#/deployment/nothing-here")
    wait_until(browser, lambda d: _alert(d, "deployment-error").startswith("404"), 30, "the 404 shown")
    # Only the expected failed loads (the two refused calls) in the browser's log.
    errors = browser_errors(browser)
    assert all(" 400 " in e or " 404 " in e for e in errors), errors
    browser.get_log("browser")  # drained: the fixture checks the log is clean


def test_add_pull_deploy_undeploy_and_remove_an_image(signed_in, base):
    browser = signed_in
    browser.get(f"{base}/console/#/images")
    smol = wait_until(browser, lambda d: [r for r in _rows(d, "images-body") if r[0] == "smol"], 30, "smol's image")
    source = smol[0][1]
    browser.find_element(By.ID, "image-alias").send_keys("smol-copy")
    browser.find_element(By.ID, "image-source").send_keys(source)
    assert browser.find_element(By.ID, "image-pull").is_selected()  # "Pull now" is the default
    browser.find_element(By.CSS_SELECTOR, "#image-form button[type=submit]").click()
    # The same bytes as smol's layer: the store has them, so the pull ends quickly (with its progress bar).
    wait_until(browser, lambda d: "done" in _text(d, "#pulls"), 120, "the pull done")
    assert browser.find_element(By.ID, "pull-smol-copy").tag_name == "progress"
    row = wait_until(browser, lambda d: [r for r in _rows(d, "images-body") if r[0] == "smol-copy"
                                         and r[2].startswith("sha256:")], 30, "smol-copy pulled")
    assert row[0][2] == smol[0][2]  # the same layer digest
    screenshot(browser, "images-pulled")
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Deploy smol-copy']").click()
    wait_until(browser, lambda d: _text(d, "#page-title") == "Deployment smol-copy", 30, "the new deployment")
    wait_until(browser, lambda d: _rows(d, "replicas-body"), 60, "its replica")
    browser.find_element(By.ID, "undeploy").click()
    browser.find_element(By.ID, "undeploy-yes").click()
    wait_until(browser, lambda d: d.current_url.endswith("#/overview"), 90, "back on the overview")
    wait_until(browser, lambda d: [r[0] for r in _rows(d, "deployments-body")] == ["smol"], 30, "smol-copy gone")
    browser.get(f"{base}/console/#/images")
    wait_until(browser, lambda d: [r for r in _rows(d, "images-body") if r[0] == "smol-copy"], 30, "smol-copy's row")
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Remove smol-copy']").click()
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Really remove smol-copy']").click()
    wait_until(browser, lambda d: [r[0] for r in _rows(d, "images-body")] == ["smol"], 30, "smol-copy removed")
    assert _alert(browser, "images-error") == ""


def test_lost_connection_is_shown_and_retried(signed_in, cluster):
    browser = signed_in
    wait_until(browser, lambda d: _rows(d, "nodes-body"), 30, "the overview's data")
    balancer = cluster.component("balancer")["pid"]
    os.kill(balancer, signal.SIGSTOP)  # accepts connections, answers nothing: a hung balancer
    try:
        wait_until(browser, lambda d: "lost" in _text(d, "#connection"), 40, "the lost-connection banner")
        assert "retrying" in _text(browser, "#connection")
        # The last data stays on screen: a lost connection never blanks the page.
        assert _rows(browser, "nodes-body")[0][0] == "local"
        screenshot(browser, "connection-lost")
    finally:
        os.kill(balancer, signal.SIGCONT)
    wait_until(browser, lambda d: "lost" not in _text(d, "#connection"), 60, "the connection restored")
    assert _rows(browser, "nodes-body")[0][0] == "local"
    browser.get_log("browser")  # the timed-out calls are expected failures here
