"""keyswap's mitmproxy entry point: `mitmdump -s addons/gateway.py ...`.

The order is the pipeline: each stage sees the flow after the ones before it."""

from keyswap.auth import Authenticate
from keyswap.cors import Cors
from keyswap.failures import Failures
from keyswap.headers import HeaderFilter
from keyswap.health import Health
from keyswap.oauth2 import OAuth2
from keyswap.pipeline import Pipeline
from keyswap.policy import Policy
from keyswap.recorder import Recorder
from keyswap.rewrite import Rewrite
from keyswap.routing import Router
from keyswap.settings import Settings
from keyswap.streaming import Streaming
from keyswap.swap import CredentialSwap
from keyswap.tls import TlsToTargets
from keyswap.upstream import UpstreamProxies

settings = Settings()
recorder = Recorder(settings)
cors = Cors(settings)
header_filter = HeaderFilter(settings)
# A retried response passes the response-side filter again.
oauth2 = OAuth2(settings, recorder, retry_pipeline=[header_filter])

stages = [
    settings,
    Router(settings),
    Health(settings, {"activity_log": recorder.report, "oauth2": oauth2.report}),
    cors,
    Authenticate(settings),
    Policy(settings),
    Rewrite(settings),
    header_filter,
    CredentialSwap(settings),
    UpstreamProxies(settings),
    Streaming(),
    oauth2,  # after Streaming: a response it may retry must not stream
    Failures(settings),
    TlsToTargets(settings),
    recorder,  # last: it sees every decision and the masked flow
]
# One registered addon that runs the stages in order: see pipeline.py for why.
addons = [Pipeline(stages)]
