"""Fixtures of the end-to-end tests: the real servers, users, and Debian's Chromium.

``servers`` is one visualizer started with the README's start command, shared by
every e2e test; tests that kill or restart the servers build their own
``harness.Servers``. ``browser`` is Debian's Chromium driven by Playwright (never
a downloaded browser).
"""
import os

import pytest
from playwright.sync_api import sync_playwright

from e2e.harness import CHROMIUM, CHROMIUM_ARGS, Servers, WebUser


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs real training or restarts servers (still run "
                                       "by default; deselect with -m 'not slow')")


@pytest.fixture(scope="package")
def playwright():
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="package")
def browser(playwright):
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is missing at %s; scripts/test.sh installs it" % CHROMIUM)
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture(scope="package")
def servers(tmp_path_factory):
    """One running visualizer for the e2e tests: 2 concurrent runs, 2 MB uploads, 2-epoch example.

    Package-scoped like ``playwright``: both end before other tests (which may start
    a Playwright of their own) run.
    """
    # Request bodies over 2 + 16 MB are refused unread: a trained example network (7 MB) can
    # be explored, and test_requests' 200 MB bodies are still refused early.
    instance = Servers(tmp_path_factory.mktemp("servers"), VISUALIZER_MAX_RUNS="2",
                       VISUALIZER_MAX_UPLOAD_MB="2", VISUALIZER_EXPLORE_MODEL_MB="16",
                       EPOCHS="2")
    instance.start()
    yield instance
    instance.cleanup()


@pytest.fixture
def make_user(playwright, servers):
    """Creates and logs in a new user of the shared servers: ``make_user("name")``."""
    users = []

    def make(username):
        user = WebUser(playwright, servers, username).register_and_login()
        users.append(user)
        return user

    yield make
    for user in users:
        user.request.dispose()
