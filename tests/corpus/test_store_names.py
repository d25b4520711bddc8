"""Defence in depth for hole 6: a bucket name that reached the S3 store by any path (a manifest, a
model-definition URL) never becomes part of a request's host."""

from __future__ import annotations

import pytest

from airflow_wmltrain.errors import ManifestError
from airflow_wmltrain.storage.s3 import S3Store
from airflow_wmltrain.storage.sigv4 import Credentials


def credentials() -> Credentials:
    return Credentials("AKIDEXAMPLE", "secret")


@pytest.mark.parametrize("bucket", ["evil:8443#", "evil.example.com:443/x", "a@evil", "x?y", "UPPER"])
def test_virtual_hosted_store_refuses_a_name_that_is_not_a_host_label(bucket: str) -> None:
    with pytest.raises(ManifestError) as info:
        S3Store(bucket, credentials=credentials, addressing_style="virtual")
    assert info.value.code == "C101"


def test_virtual_hosted_store_puts_a_valid_name_in_the_host() -> None:
    store = S3Store("my-bucket", credentials=credentials)
    request = store.sign("GET", "k")
    assert request.url.startswith("https://my-bucket.s3.")
