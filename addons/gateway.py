"""keyswap's mitmproxy entry point: `mitmdump -s addons/gateway.py ...`.

The order is the pipeline: each addon sees the flow after the ones before it."""

from keyswap.auth import Authenticate
from keyswap.cors import Cors
from keyswap.failures import Failures
from keyswap.headers import HeaderFilter
from keyswap.health import Health
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

addons = [
    settings,
    Router(settings),
    Health(settings, {"activity_log": recorder.report}),
    Cors(settings),
    Authenticate(settings),
    Policy(settings),
    Rewrite(settings),
    HeaderFilter(settings),
    CredentialSwap(settings),
    UpstreamProxies(settings),
    Streaming(),
    Failures(settings),
    TlsToTargets(settings),
    recorder,  # last: it sees every decision and the masked flow
]
