"""Redis URL parsing: single servers and Sentinel."""

from __future__ import annotations

import pytest

from uwsgi_ws.exceptions import ConfigurationError
from uwsgi_ws.redis_url import SentinelTarget, check_url, parse_sentinel_url


def test_sentinel_url():
    assert parse_sentinel_url("redis+sentinel://:s3cret@10.0.0.1:26379,[::1]:26380/mymaster/2") == SentinelTarget(
        (("10.0.0.1", 26379), ("::1", 26380)), "mymaster", 2, "s3cret"
    )
    assert parse_sentinel_url("redis+sentinel://h:26379/svc").db == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost",
        "localhost:6379",
        "redis+sentinel://h:26379",
        "redis+sentinel://h/svc",
        "redis+sentinel://h:26379/svc/x",
        "redis+sentinel://h:26379/a/1/2",
    ],
)
def test_bad_urls_are_configuration_errors(url):
    with pytest.raises(ConfigurationError):
        check_url(url)


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://h", "unix:///tmp/r.sock", "redis+sentinel://h:1/s"])
def test_good_urls(url):
    assert check_url(url) == url
