"""Requests against the real servers: the pages' Content-Security-Policy in Chromium, request
bodies over the limit refused by the WSGI server before they are read, logins throttled, and
sessions ended on the server at logout."""
import select
import socket

import pytest

from custom_keras import registry
from e2e.harness import (CSRF_PATTERN, Servers, WebUser, bokeh_state, fake_training, screenshot,
                         wait_for)

MB = 1024 * 1024
HUGE_BODY = 200 * MB
PAGE_TIMEOUT_MS = 30000


def csp_reports(page):
    """Collects, in the returned list, every CSP violation the page reports (console and event)."""
    reports = []
    page.on("console", lambda message: "Content Security Policy" in message.text
            and reports.append(message.text))
    page.add_init_script("""document.addEventListener("securitypolicyviolation", (event) => {
        console.error("Content Security Policy violation: " + event.violatedDirective + " "
                      + event.blockedURI);
    }, true);""")
    return reports


def test_technique_tabs_draw_their_dashboards_with_no_csp_violation(browser, servers, make_user):
    user = make_user("csp_user_1")
    script_id = user.upload_script("csp_run.py", fake_training("csp_run", snapshots=3))
    user.run(script_id)
    assert user.wait_for_state(script_id, "finished", 120)["state"] == "finished"
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  storage_state=user.request.storage_state())
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = context.new_page()
    reports = csp_reports(page)
    try:
        response = page.goto("%s/scripts/%d/techniques/saliency_maps" % (servers.url, script_id))
        policy = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "'unsafe-inline'" not in policy.split(
            "script-src")[1].split(";")[0]
        wait_for(lambda: bokeh_state(page)["images"] > 0, 60, interval=0.5,
                 what="the saliency dashboard to draw its images")
        assert page.locator(".dashboard canvas").count() > 0
        screenshot(page, "csp_saliency_maps")
        page.goto("%s/scripts/%d/techniques/training_progress" % (servers.url, script_id))
        wait_for(lambda: bokeh_state(page)["progress"] >= 3, 60, interval=0.5,
                 what="the training-progress dashboard to draw its rows")
        screenshot(page, "csp_training_progress")
        for technique in registry.TECHNIQUES:  # the others, without data, say so in BokehJS
            page.goto("%s/scripts/%d/techniques/%s" % (servers.url, script_id, technique.key))
            wait_for(lambda: bokeh_state(page)["texts"] or bokeh_state(page)["progress"] > 0, 60,
                     interval=0.5, what="the %s dashboard to draw" % technique.key)
        page.goto("%s/scripts/%d" % (servers.url, script_id))
        page.get_by_role("button", name="Run", exact=True).click()  # app.js opens the dialog
        assert page.locator("dialog#run-dialog").is_visible()
    finally:
        context.close()
    assert reports == []


def send_huge_body(servers, headers, chunk):
    """POSTs to /auth/login, sending ``chunk`` until the server answers; returns
    (bytes sent, the server's first answer)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", servers.port), timeout=30) as connection:
        connection.sendall(("POST /auth/login HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                            "Content-Type: application/x-www-form-urlencoded\r\n%s\r\n"
                            % (servers.port, headers)).encode())
        try:
            while sent < HUGE_BODY and not select.select([connection], [], [], 0)[0]:
                connection.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection: it does not read the rest
        try:
            answer = connection.recv(4096)
        except ConnectionResetError:
            answer = b""
    return sent, answer


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_200_mb_post_to_login_is_refused_before_the_body_is_read(servers, framing):
    rss_before = servers.rss_kb()
    if framing == "content-length":
        sent, answer = send_huge_body(servers, "Content-Length: %d\r\n" % HUGE_BODY, b"x" * MB)
    else:
        sent, answer = send_huge_body(servers, "Transfer-Encoding: chunked\r\n",
                                      b"%x\r\n%s\r\n" % (MB, b"x" * MB))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # The servers' limit is VISUALIZER_MAX_UPLOAD_MB=2 + VISUALIZER_EXPLORE_MODEL_MB=16 plus a
    # margin: far less than was offered.
    assert sent < 40 * MB
    assert servers.rss_kb() - rss_before < 20 * 1024
    with socket.create_connection(("127.0.0.1", servers.port), timeout=10):
        pass  # still serving


def test_a_cookie_copied_before_logout_is_refused_after_it(playwright, servers, make_user):
    user = make_user("cookie_user1")
    thief = playwright.request.new_context(base_url=servers.url,
                                           storage_state=user.request.storage_state())
    try:
        assert thief.get("/", max_redirects=0).status == 200
        response = user.post("/auth/logout", form={"csrf_token": user.csrf_token("/")})
        assert response.status == 302
        response = thief.get("/", max_redirects=0)
        assert response.status == 302 and "/auth/login" in response.headers["location"]
    finally:
        thief.dispose()


def test_wrong_passwords_are_refused_with_429_after_five(playwright, tmp_path):
    # Servers of its own: the lock-out also holds this test's address (127.0.0.1).
    servers = Servers(tmp_path / "throttled").start()
    try:
        WebUser(playwright, servers, "victim_user").register_and_login().request.dispose()
        attacker = playwright.request.new_context(base_url=servers.url)
        responses = []
        for attempt in range(30):
            token = CSRF_PATTERN.search(attacker.get("/auth/login").text()).group(1)
            responses.append(attacker.post("/auth/login", max_redirects=0, form={
                "csrf_token": token, "username": "victim_user", "password": "guess %d" % attempt}))
        statuses = [response.status for response in responses]
        assert statuses[:6] == [200] * 5 + [429]
        assert statuses.count(200) < 10  # a few more only as lock-outs of 1 s, 2 s ... end
        assert ("Too many failed logins for this user name. Try again in 1 second"
                in responses[5].text())
        assert responses[5].headers["retry-after"] == "1"
        attacker.dispose()
    finally:
        servers.cleanup()
