"""The billing flow's pages: self-contained, escaped, and admitted by their own CSP."""
from __future__ import annotations

import base64
import hashlib
import re

from timbre_gateway.http.pages import already_subscribed_page, security_headers, signup_page, success_page


def test_token_is_escaped() -> None:
    html = success_page('"><script>alert(1)</script>')
    assert "<script>alert(1)" not in html
    assert 'data-token="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in html


def test_no_external_assets() -> None:
    for html in (signup_page(), success_page("t"), already_subscribed_page()):
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
        assert "@import" not in html


def test_csp_admits_exactly_the_inline_script_and_style() -> None:
    csp = security_headers()["Content-Security-Policy"]
    for html in (signup_page(), success_page("tok")):
        for tag in ("script", "style"):
            source = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.S)
            assert source
            digest = base64.b64encode(hashlib.sha256(source.group(1).encode()).digest()).decode()
            assert f"'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp


def test_signup_form_posts_to_checkout() -> None:
    html = signup_page()
    assert 'id="signup"' in html and 'type="email"' in html and "fetch('/v1/checkout'" in html


def test_success_page_tells_an_expired_key_from_one_already_shown() -> None:
    html = success_page("t")
    assert "b.expired" in html and "expired before it was collected" in html and "already shown" in html
