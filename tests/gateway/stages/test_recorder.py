from pathlib import Path

import yaml
from mitmproxy.test import tflow

from keyswap.config.model import Config
from keyswap.config.secrets import Redaction
from keyswap.gateway import problem
from keyswap.gateway.stages.recorder import _preview, annotate
from keyswap.state.store import open_db
from tests.support import ROOT

CONFIG = Config.model_validate(
    {"credentials": {"b": {"type": "bearer", "token": "bearer-secret-3"}}}
)


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
