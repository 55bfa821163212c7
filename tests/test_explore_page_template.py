"""The explorer page as the server renders it: what explore.js reads from it."""
import json
import re

from test_explore_views import new_exploration


def test_the_explorer_page_carries_its_endpoints_csrf_token_and_script(client, auth):
    auth.register_and_login()
    assert new_exploration(client).headers["Location"].endswith("/explore/1")
    page = client.get("/explore/1").get_data(as_text=True)
    urls = json.loads(re.search(r"data-urls='([^']+)'", page).group(1))
    for key in ("state", "predictions", "architecture", "layers", "compute", "marks", "set_mark",
                "marks_download"):
        assert urls[key].startswith("/explore/1/"), key
    assert 'data-index-url="/explore/"' in page
    assert re.search(r'<meta name="csrf-token" content="[^"]+">', page)
    assert '<script src="/static/explore.js" defer></script>' in page
    assert "<script>" not in page  # the CSP allows no inline script without the nonce
