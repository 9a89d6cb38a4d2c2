"""The S3 test server (tests/services/s3_server.py) does what tests rely on: obstore reaches it
from the environment alone, injected faults hit exactly the requests they should, and the request
log shows them."""

from __future__ import annotations

import os

import obstore
import pytest
from obstore.exceptions import BaseError
from obstore.store import S3Store


def test_obstore_sees_two_injected_503s_then_the_right_bytes(s3):
    s3.create_bucket("unetdist-test")
    # endpoint, keys, region and AWS_ALLOW_HTTP from the environment the fixture set; no retries,
    # so each get_range is one request and the injected faults surface
    store = S3Store("unetdist-test", retry_config={"max_retries": 0})
    data = os.urandom(64 * 1024)
    obstore.put(store, "tiles/a.bin", data)

    s3.set_faults(fail_next=2, only_get=True)
    for _ in range(2):
        with pytest.raises(BaseError, match="503|SlowDown"):
            obstore.get_range(store, "tiles/a.bin", start=1000, length=4096)
    assert bytes(obstore.get_range(store, "tiles/a.bin", start=1000, length=4096)) == data[1000:5096]

    gets = s3.requests()
    assert [row[3] for row in gets] == ["503", "503", "206"]
    assert [row[2] for row in gets] == ["bytes=1000-5095"] * 3
    assert [row[6] for row in gets] == ["fail", "fail", "-"]
    assert [row[0] for row in s3.requests(method=None)] == ["PUT", "PUT", "GET", "GET", "GET"]
    assert s3.faults()["fail_next"] == 0
