import json
from pathlib import Path

import pytest
import yaml
from mitmproxy.http import Headers
from mitmproxy.test import tflow

from keyswap import problem
from keyswap.config import Config
from keyswap.recorder import Redaction, _preview, annotate, to_json
from keyswap.store import open_db

from .conftest import ROOT

CONFIG = Config.model_validate(
    {
        "credentials": {
            "h": {"type": "header", "name": "x-api-key", "value": "header-secret-1"},
            "q": {"type": "query", "name": "key", "value": "query-secret-2"},
            "b": {"type": "bearer", "token": "bearer-secret-3"},
        }
    }
)


def test_headers_are_redacted_by_name_and_value() -> None:
    redact = Redaction(CONFIG)
    headers = Headers(
        [
            (b"Authorization", b"Bearer x"),
            (b"X-Api-Key", b"k"),
            (b"Cookie", b"a=1"),
            (b"Cookie", b"b=2"),
            (b"X-Echo", b"got bearer-secret-3 back"),
            (b"Accept", b"*/*"),
        ]
    )
    assert redact.header_dict(headers) == {
        "authorization": "********",
        "x-api-key": "********",
        "cookie": "********, ********",
        "x-echo": "got ******** back",
        "accept": "*/*",
    }


@pytest.mark.parametrize(
    "headers",
    [{}, {"a": "b"}, {"q": 'say "hi"\\', "u": "caf\u00e9 \u2603", "c": "\x00\x1f", "s": "\udcff"}],
)
def test_header_json_is_what_json_dumps_writes(headers: dict[str, str]) -> None:
    assert to_json(headers) == json.dumps(headers)


def test_urls_mask_credential_query_parameters() -> None:
    redact = Redaction(CONFIG)
    assert redact.url("https://x/y?a=1&key=query-secret-2") == "https://x/y?a=1&key=********"
    assert redact.url("https://x/y?a=1") == "https://x/y?a=1"


def test_previews_mask_secrets_before_cutting() -> None:
    flow = tflow.tflow(resp=True)
    assert flow.response is not None
    flow.response.content = b'{"token": "bearer-secret-3", "more": "data"}'
    preview = _preview(flow.response, 24, Redaction(CONFIG))
    assert preview == '{"token": "********", "m'
    flow.response.content = b"0123456789bearer-secret-3"
    assert _preview(flow.response, 15, Redaction(CONFIG)) == "0123456789*****"


def test_mitmweb_sees_the_decision() -> None:
    flow = tflow.tflow()
    annotate(flow, {"proxy_id": "crm", "proxy_code": problem.DENIED, "message": "wrong token"})
    assert flow.comment == "keyswap crm: proxy-access-denied: wrong token"
    assert flow.marked


def test_datasette_canned_queries_run_on_the_schema(tmp_path: Path) -> None:
    metadata = yaml.safe_load((ROOT / "config" / "datasette.yaml").read_text())
    queries = metadata["databases"]["keyswap"]["queries"]
    assert {"errors_last_hour", "slowest_requests", "volume_per_proxy_per_hour"} <= set(queries)
    db = open_db(tmp_path / "keyswap.db")
    try:
        for query in queries.values():
            list(db.query(query["sql"]))
    finally:
        db.close()
