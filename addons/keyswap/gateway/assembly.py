"""The gateway assembled: every stage in pipeline order. Each stage sees the flow after
the ones before it."""

from __future__ import annotations

from typing import Any

from keyswap.gateway.pipeline import Pipeline
from keyswap.gateway.reuse_port import ReusePort
from keyswap.gateway.settings import Settings
from keyswap.gateway.stages.async_accept import AsyncAccept
from keyswap.gateway.stages.async_status import AsyncStatus
from keyswap.gateway.stages.auth import Authenticate
from keyswap.gateway.stages.cors import Cors
from keyswap.gateway.stages.deliveries import Deliveries
from keyswap.gateway.stages.drain import Drain
from keyswap.gateway.stages.echo_mask import EchoMask
from keyswap.gateway.stages.failures import Failures
from keyswap.gateway.stages.firewall import Firewall
from keyswap.gateway.stages.forward_routing import ForwardRouter
from keyswap.gateway.stages.head_gate import HeadGate
from keyswap.gateway.stages.headers import HeaderFilter
from keyswap.gateway.stages.health import Health
from keyswap.gateway.stages.oauth2 import OAuth2
from keyswap.gateway.stages.policy import Policy
from keyswap.gateway.stages.recorder import Recorder
from keyswap.gateway.stages.rewrite import Rewrite
from keyswap.gateway.stages.routing import Router
from keyswap.gateway.stages.streaming import Streaming
from keyswap.gateway.stages.swap import CredentialSwap
from keyswap.gateway.stages.tls import TlsToTargets
from keyswap.gateway.stages.upstream import UpstreamProxies


def build() -> list[Any]:
    """A fresh gateway: the stages in pipeline order, as one Pipeline addon."""
    settings = Settings()
    recorder = Recorder(settings)
    cors = Cors(settings)
    header_filter = HeaderFilter(settings)
    # A retried response passes the response-side filter again.
    oauth2 = OAuth2(settings, recorder, retry_pipeline=[header_filter])
    recorder.secret_sources.append(lambda: oauth2.issued)
    deliveries = Deliveries(settings, recorder)

    stages = [
        settings,
        ReusePort(),  # keyswap_reuse_port; keyswap serve adds one to the master too: see there
        HeadGate(settings, recorder.record),  # limits while a request head arrives
        Firewall(settings),  # first on a parsed request: nothing reads it before this
        deliveries,  # its `done` stops leasing and lets its attempts end, before the drain
        Drain(),  # its `done` waits for requests in flight before the others close
        ForwardRouter(settings, recorder.redaction),  # forward mode: by the tunnel, and token
        Router(settings),
        AsyncStatus(settings, deliveries),  # /_keyswap/requests/<id>, before health's 404
        Health(
            settings,
            {
                "backend": recorder.backend_report,
                "activity_log": recorder.report,
                "oauth2": oauth2.report,
                "async": deliveries.report,
            },
        ),
        cors,
        Authenticate(settings),
        Policy(settings),
        AsyncAccept(settings, deliveries),  # respond-async: stored, answered 202
        Rewrite(settings),
        header_filter,
        CredentialSwap(settings),
        UpstreamProxies(settings),
        Streaming(),
        oauth2,  # after Streaming: a response it may retry must not stream
        EchoMask(recorder.redaction),  # forward mode: after oauth2, whose retry it also masks
        Failures(settings),
        TlsToTargets(settings),
        recorder,  # last: it sees every decision and the masked flow
    ]
    # One registered addon that runs the stages in order: see pipeline.py for why.
    return [Pipeline(stages)]
