"""A cookie jar that keeps nothing, for HTTP clients shared by many users.

httpx stores every `Set-Cookie` a server sends and replays it on later
requests. A client shared by all users (the proxy's upstream client, the
extraction and embedding clients, which also carry per-user keys) would carry
one user's cookies to the next.
"""

from __future__ import annotations

from http.cookiejar import Cookie, CookieJar
from typing import Any


class NoCookies(CookieJar):
    def set_cookie(self, cookie: Cookie) -> None:
        return None

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None
